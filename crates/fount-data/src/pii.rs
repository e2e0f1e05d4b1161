//! PII redaction: e-mail addresses, public IP addresses, phone numbers and mainland-China resident
//! ID numbers are replaced with typed placeholders (`<EMAIL>`, `<IP_ADDRESS>`, `<PHONE>`, `<CN_ID>`).
//!
//! Candidates come from regular expressions and are then validated, so valid-looking non-PII is
//! left alone:
//! - IPv4: four octets ≤ 255 without leading zeros, not part of a longer dotted number, not after
//!   "version"/"v", and globally routable (private, loopback, link-local, shared, documentation,
//!   multicast and reserved ranges are kept, as datatrove's `PIIFormatter` keeps non-public ones);
//! - IPv6: parsed by the standard library, global unicast only (`2000::/3` minus documentation);
//! - phones: North American `(NXX) NXX-XXXX`, international `+CC …` with 8–15 digits, and
//!   mainland-China mobile numbers `1[3-9]` + 9 digits (optionally `+86`), never inside a longer
//!   digit run;
//! - resident IDs: 17 digits and a check character, a valid birth date, and the ISO 7064
//!   MOD 11-2 checksum of GB 11643-1999.

use std::net::Ipv6Addr;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The kinds of PII that are redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    /// E-mail address.
    Email,
    /// Public IPv4 or IPv6 address.
    IpAddress,
    /// Phone number.
    Phone,
    /// Mainland-China resident ID number.
    CnId,
}

impl PiiKind {
    /// The placeholder written in place of a value.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "<EMAIL>",
            PiiKind::IpAddress => "<IP_ADDRESS>",
            PiiKind::Phone => "<PHONE>",
            PiiKind::CnId => "<CN_ID>",
        }
    }

    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::IpAddress => "ip_address",
            PiiKind::Phone => "phone",
            PiiKind::CnId => "cn_id",
        }
    }

    /// All kinds, in manifest order.
    pub const ALL: [PiiKind; 4] = [
        PiiKind::Email,
        PiiKind::IpAddress,
        PiiKind::Phone,
        PiiKind::CnId,
    ];
}

/// Which kinds to redact.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PiiConfig {
    /// Redact e-mail addresses.
    pub email: bool,
    /// Redact public IP addresses.
    pub ip_address: bool,
    /// Redact phone numbers.
    pub phone: bool,
    /// Redact mainland-China resident ID numbers.
    pub cn_id: bool,
}

impl Default for PiiConfig {
    fn default() -> Self {
        PiiConfig {
            email: true,
            ip_address: true,
            phone: true,
            cn_id: true,
        }
    }
}

struct Patterns {
    email: Regex,
    ipv4: Regex,
    ipv6: Regex,
    phone: Vec<Regex>,
    cn_id: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        // The expressions are constants: a failure here is a programming error caught by tests.
        let re = |s: &str| Regex::new(s).unwrap_or_else(|e| panic!("bad PII pattern {s}: {e}"));
        Patterns {
            email: re(r"(?i)[a-z0-9][a-z0-9._%+-]*@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.[a-z]{2,24}"),
            ipv4: re(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
            ipv6: re(r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}"),
            phone: vec![
                re(r"(?:\+|00)86[ -]?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"),
                re(r"1[3-9]\d{9}"),
                re(r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"),
                re(r"\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"),
                re(r"\d{3}[.-]\d{3}[.-]\d{4}"),
            ],
            cn_id: re(r"\d{17}[\dXx]"),
        }
    })
}

/// The check character of a mainland-China resident ID from its first 17 digits (ISO 7064
/// MOD 11-2), or `None` if they are not 17 ASCII digits.
pub fn cn_id_check_char(first17: &str) -> Option<char> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
    if first17.len() != 17 {
        return None;
    }
    let mut sum = 0;
    for (c, w) in first17.chars().zip(WEIGHTS) {
        sum += c.to_digit(10)? * w;
    }
    Some(CHECK[(sum % 11) as usize])
}

/// Whether `s` is a valid 18-character mainland-China resident ID number.
pub fn is_valid_cn_id(s: &str) -> bool {
    if s.len() != 18 || !s.is_ascii() {
        return false;
    }
    let (body, check) = s.split_at(17);
    let Some(expected) = cn_id_check_char(body) else {
        return false;
    };
    let year: u32 = body[6..10].parse().unwrap_or(0);
    let month: u32 = body[10..12].parse().unwrap_or(0);
    let day: u32 = body[12..14].parse().unwrap_or(0);
    (1900..=2099).contains(&year)
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && check.eq_ignore_ascii_case(&expected.to_string())
}

fn is_public_ipv4(o: [u8; 4]) -> bool {
    let reserved = matches!(
        o,
        [0, ..]
            | [10, ..]
            | [127, ..]
            | [169, 254, ..]
            | [192, 168, ..]
            | [192, 0, 2, _]
            | [198, 51, 100, _]
            | [203, 0, 113, _]
            | [192, 0, 0, _]
    );
    let private_172 = o[0] == 172 && (16..32).contains(&o[1]);
    let shared_100 = o[0] == 100 && (64..128).contains(&o[1]);
    let benchmark_198 = o[0] == 198 && (18..20).contains(&o[1]);
    let multicast_or_reserved = o[0] >= 224;
    !(reserved || private_172 || shared_100 || benchmark_198 || multicast_or_reserved)
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut out {
        let p = parts.next()?;
        if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn is_public_ipv6(a: &Ipv6Addr) -> bool {
    let seg = a.segments();
    (seg[0] & 0xe000) == 0x2000 && !(seg[0] == 0x2001 && seg[1] == 0x0db8)
}

fn prev_char(text: &str, i: usize) -> Option<char> {
    text[..i].chars().next_back()
}

fn next_char(text: &str, i: usize) -> Option<char> {
    text[i..].chars().next()
}

/// Finds PII spans `(start, end, kind)` in `text`, sorted and non-overlapping.
pub fn find_pii(text: &str, cfg: &PiiConfig) -> Vec<(usize, usize, PiiKind)> {
    let p = patterns();
    let mut spans: Vec<(usize, usize, PiiKind)> = Vec::new();
    let digit_at = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    if cfg.cn_id {
        for m in p.cn_id.find_iter(text) {
            if !digit_at(prev_char(text, m.start()))
                && !next_char(text, m.end()).is_some_and(|c| c.is_ascii_alphanumeric())
                && is_valid_cn_id(m.as_str())
            {
                spans.push((m.start(), m.end(), PiiKind::CnId));
            }
        }
    }
    if cfg.email {
        for m in p.email.find_iter(text) {
            spans.push((m.start(), m.end(), PiiKind::Email));
        }
    }
    if cfg.ip_address {
        for m in p.ipv4.find_iter(text) {
            let before = prev_char(text, m.start());
            let after = &text[m.end()..];
            let dotted_more =
                after.starts_with('.') && after[1..].starts_with(|c: char| c.is_ascii_digit());
            let lead = text[..m.start()].trim_end().to_ascii_lowercase();
            let versiony = before.is_some_and(|c| c == 'v' || c == 'V')
                || lead.ends_with("version")
                || lead.ends_with("ver.")
                || lead.ends_with("release");
            if digit_at(before)
                || before == Some('.')
                || dotted_more
                || digit_at(next_char(text, m.end()))
                || versiony
            {
                continue;
            }
            if parse_ipv4(m.as_str()).is_some_and(is_public_ipv4) {
                spans.push((m.start(), m.end(), PiiKind::IpAddress));
            }
        }
        for m in p.ipv6.find_iter(text) {
            let s = m.as_str();
            if s.matches(':').count() < 2
                || next_char(text, m.end()).is_some_and(|c| c.is_ascii_hexdigit())
            {
                continue;
            }
            if s.parse::<Ipv6Addr>().is_ok_and(|a| is_public_ipv6(&a)) {
                spans.push((m.start(), m.end(), PiiKind::IpAddress));
            }
        }
    }
    if cfg.phone {
        for re in &p.phone {
            for m in re.find_iter(text) {
                let digits = m.as_str().bytes().filter(u8::is_ascii_digit).count();
                if digit_at(prev_char(text, m.start()))
                    || digit_at(next_char(text, m.end()))
                    || prev_char(text, m.start()) == Some('.')
                    || !(8..=15).contains(&digits)
                {
                    continue;
                }
                spans.push((m.start(), m.end(), PiiKind::Phone));
            }
        }
    }
    spans.sort_by_key(|&(s, e, _)| (s, std::cmp::Reverse(e)));
    let mut out: Vec<(usize, usize, PiiKind)> = Vec::with_capacity(spans.len());
    for s in spans {
        if out.last().is_none_or(|l| s.0 >= l.1) {
            out.push(s);
        }
    }
    out
}

/// Replaces PII in `text`; adds the number of replacements per kind to `counts`
/// (indexed as [`PiiKind::ALL`]). Returns `None` when nothing was found (the text is unchanged).
pub fn redact(text: &str, cfg: &PiiConfig, counts: &mut [u64; 4]) -> Option<String> {
    let spans = find_pii(text, cfg);
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (s, e, kind) in spans {
        out.push_str(&text[last..s]);
        out.push_str(kind.placeholder());
        counts[kind as usize] += 1;
        last = e;
    }
    out.push_str(&text[last..]);
    Some(out)
}
