//! PII redaction: planted values go, look-alikes stay.

use fount_data::pii::{find_pii, is_valid_cn_id, redact, PiiConfig, PiiKind};

fn redacted(text: &str) -> (String, [u64; 4]) {
    let mut counts = [0u64; 4];
    let out = redact(text, &PiiConfig::default(), &mut counts).unwrap_or_else(|| text.to_string());
    (out, counts)
}

#[test]
fn emails_ips_phones_ids_are_replaced() {
    let cases = [
        (
            "Write to anna.lee42@mail.example.com today.",
            "Write to <EMAIL> today.",
            PiiKind::Email,
        ),
        (
            "The server 8.8.4.4 answered.",
            "The server <IP_ADDRESS> answered.",
            PiiKind::IpAddress,
        ),
        (
            "Ping 2a00:1450:4001:82a::200e now.",
            "Ping <IP_ADDRESS> now.",
            PiiKind::IpAddress,
        ),
        (
            "Call +1 (415) 555-0134 now.",
            "Call <PHONE> now.",
            PiiKind::Phone,
        ),
        (
            "Call 415-555-0134 now.",
            "Call <PHONE> now.",
            PiiKind::Phone,
        ),
        (
            "Ring +44 20 7946 0958 please.",
            "Ring <PHONE> please.",
            PiiKind::Phone,
        ),
        (
            "联系电话：13812345678 ，工作日。",
            "联系电话：<PHONE> ，工作日。",
            PiiKind::Phone,
        ),
        (
            "电话 +86 138 1234 5678 。",
            "电话 <PHONE> 。",
            PiiKind::Phone,
        ),
        (
            "身份证号码为 11010519491231002X ，已核实。",
            "身份证号码为 <CN_ID> ，已核实。",
            PiiKind::CnId,
        ),
    ];
    for (text, want, kind) in cases {
        let (got, counts) = redacted(text);
        assert_eq!(got, want, "{text}");
        assert_eq!(counts[kind as usize], 1, "{text}");
        assert_eq!(counts.iter().sum::<u64>(), 1, "{text}");
    }
}

#[test]
fn look_alikes_are_left_alone() {
    let keep = [
        "Upgrade to version 1.2.3.4 of the tools.",
        "The build v2.10.0.1 is out.",
        "Private hosts 192.168.1.20 and 10.0.0.7 and 127.0.0.1 stay.",
        "The reference number 110105194912310021 was printed twice.",
        "Not an address: 999.1.1.1 or 1.2.3.4.5 in the table.",
        "The ratio was 3.14159 and the year 2024-03-05 12:30:45.",
        "Order 123456789012345678901 shipped.",
        "Documentation prefix 2001:db8::1 and loopback ::1 stay.",
    ];
    for text in keep {
        assert!(
            find_pii(text, &PiiConfig::default()).is_empty(),
            "{text}: {:?}",
            find_pii(text, &PiiConfig::default())
        );
    }
}

#[test]
fn resident_id_checksum() {
    // GB 11643-1999's own example
    assert!(is_valid_cn_id("11010519491231002X"));
    assert!(is_valid_cn_id("11010519491231002x"));
    assert!(!is_valid_cn_id("110105194912310021"), "wrong check digit");
    assert!(!is_valid_cn_id("11010519491331002X"), "month 13");
    assert!(!is_valid_cn_id("1101051949123100"), "too short");
}

#[test]
fn kinds_can_be_switched_off() {
    let cfg = PiiConfig {
        email: false,
        ..Default::default()
    };
    let text = "mail a@example.org or call 415-555-0134";
    let mut counts = [0u64; 4];
    let out = redact(text, &cfg, &mut counts).unwrap();
    assert_eq!(out, "mail a@example.org or call <PHONE>");
}
