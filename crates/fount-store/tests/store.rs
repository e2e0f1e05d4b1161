use fount_store::{dollars, ApiKey, Backend, Price, Quota, Scope, Subject, UsageRecord};

use crate::util::stores;

#[tokio::test]
async fn tenants_and_keys() {
    for (s, _dir) in stores("keys").await {
        let b = s.backend();
        let acme = s.create_tenant("acme").await.unwrap();
        let other = s.create_tenant("other").await.unwrap();
        assert!(
            s.create_tenant("acme").await.is_err(),
            "{b:?}: names are unique"
        );
        assert!(s.create_tenant("no spaces").await.is_err());
        let names: Vec<String> = s
            .tenants()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["acme", "other"]);
        let (key, info) = s
            .create_key(&acme.id, "ci", &[Scope::Inference, Scope::Inference], None)
            .await
            .unwrap();
        assert_eq!(info.scopes, [Scope::Inference]);
        assert!(key.expose().starts_with(&info.prefix));
        let (k, t) = s.authenticate(&key).await.unwrap().unwrap();
        assert_eq!((k.id.as_str(), t.name.as_str()), (info.id.as_str(), "acme"));
        // unknown, malformed and other tenants' keys
        assert!(s.authenticate(&ApiKey::generate()).await.unwrap().is_none());
        assert!(s
            .authenticate(&ApiKey::from_secret("Bearer x"))
            .await
            .unwrap()
            .is_none());
        let (key2, _) = s
            .create_key(&other.id, "o", &[Scope::Admin], None)
            .await
            .unwrap();
        assert_eq!(
            s.authenticate(&key2).await.unwrap().unwrap().1.name,
            "other"
        );
        // listing shows prefixes, never keys
        let listed = s.keys(Some(&acme.id)).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(s.keys(None).await.unwrap().len(), 2);
        // revocation takes effect at once; revoking twice reports nothing to do
        assert!(s.revoke_key(&info.prefix).await.unwrap());
        assert!(!s.revoke_key(&info.id).await.unwrap());
        assert!(
            s.authenticate(&key).await.unwrap().is_none(),
            "{b:?}: revoked"
        );
        // an expired key is refused
        let (old, _) = s
            .create_key(&acme.id, "old", &[Scope::Inference], Some(1))
            .await
            .unwrap();
        assert!(
            s.authenticate(&old).await.unwrap().is_none(),
            "{b:?}: expired"
        );
        assert!(s
            .create_key("ten_nope", "x", &[Scope::Inference], None)
            .await
            .is_err());
        assert!(s.create_key(&acme.id, "x", &[], None).await.is_err());
    }
}

#[tokio::test]
async fn quotas_round_trip_for_tenants_and_keys() {
    for (s, _dir) in stores("quota").await {
        let b = s.backend();
        let t = s.create_tenant("acme").await.unwrap();
        let tenant = Subject::Tenant(&t.id);
        assert_eq!(s.quota(tenant).await.unwrap(), Quota::default());
        let q = Quota {
            requests_per_minute: Some(60),
            tokens_per_day: Some(1_000_000),
            models: Some(vec!["tiny".into(), "support".into()]),
            weight: Some(3),
            ..Default::default()
        };
        s.set_quota(tenant, &q).await.unwrap();
        assert_eq!(s.quota(tenant).await.unwrap(), q);
        let q2 = Quota {
            concurrent_requests: Some(2),
            ..Default::default()
        };
        s.set_quota(tenant, &q2).await.unwrap();
        assert_eq!(s.quota(tenant).await.unwrap(), q2, "{b:?}: replaced");
        assert!(s.set_quota(Subject::Tenant("ten_nope"), &q).await.is_err());

        // a key's quota is its own, and carries no weight
        let (_, k) = s
            .create_key(&t.id, "ci", &[Scope::Inference], None)
            .await
            .unwrap();
        let key = Subject::Key(&k.id);
        assert_eq!(s.quota(key).await.unwrap(), Quota::default());
        let kq = Quota {
            tokens_per_minute: Some(500),
            max_context: Some(64),
            ..Default::default()
        };
        s.set_quota(key, &kq).await.unwrap();
        assert_eq!(s.quota(key).await.unwrap(), kq, "{b:?}");
        assert_eq!(s.quota(tenant).await.unwrap(), q2, "{b:?}: untouched");
        let e = s
            .set_quota(Subject::Key("key_nope"), &kq)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }
}

#[tokio::test]
async fn prices_and_costs() {
    assert_eq!(Price::parse_dollars("0.15"), Some(150_000));
    assert_eq!(Price::parse_dollars("$2"), Some(2_000_000));
    assert_eq!(Price::parse_dollars(".5"), Some(500_000));
    for bad in ["", ".", "-1", "1e3", "0.0000001", "abc", "1.2.3"] {
        assert_eq!(Price::parse_dollars(bad), None, "{bad:?}");
    }
    // 1,000 prompt tokens (400 cached) and 100 generated at $0.15 / $0.075 / $0.60 per million
    let p = Price {
        input: 150_000,
        cached_input: 75_000,
        output: 600_000,
        training: 3_000_000,
    };
    let cost = p.cost(1000, 400, 100);
    assert_eq!(cost, 600 * 150_000 + 400 * 75_000 + 100 * 600_000);
    assert_eq!(dollars(i128::from(cost), 6), "0.000180");
    assert_eq!(dollars(1_500_000_000_000, 2), "1.50");
    for (s, _dir) in stores("prices").await {
        assert!(s.prices().await.unwrap().is_empty());
        s.set_price("tiny", &p).await.unwrap();
        s.set_price("tiny", &Price { output: 1, ..p })
            .await
            .unwrap();
        let prices = s.prices().await.unwrap();
        assert_eq!(prices, [("tiny".to_string(), Price { output: 1, ..p })]);
        assert!(s.set_price("x", &Price { input: -1, ..p }).await.is_err());
    }
}

fn record(id: &str, tenant: &str, model: &str, at_ms: i64, completion: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        tenant_id: tenant.into(),
        key_id: "key_x".into(),
        model: model.into(),
        adapter: None,
        prompt_tokens: 10,
        cached_tokens: 4,
        completion_tokens: completion,
        status: 200,
        latency_ms: 5,
        created_at_ms: at_ms,
        cost_picodollars: completion * 1_000,
        kind: fount_store::UsageKind::Inference,
        slot_ms: 0,
    }
}

#[tokio::test]
async fn usage_is_recorded_once_and_summed_by_day() {
    const DAY: i64 = 86_400_000;
    for (s, _dir) in stores("usage").await {
        let base = 1_795_910_400_000; // 2026-11-29 00:00 UTC
        let batch = vec![
            record("r1", "ten_a", "tiny", base + 1, 3),
            record("r2", "ten_a", "tiny", base + 2, 5),
            record("r3", "ten_a", "support", base + DAY, 7),
            record("r4", "ten_b", "tiny", base + 3, 11),
        ];
        assert_eq!(s.record_usage(&batch).await.unwrap(), 4);
        // the same batch again (a retried write) adds nothing
        assert_eq!(s.record_usage(&batch).await.unwrap(), 0);
        // nor does a record twice in one batch; a batch larger than one statement is one
        // transaction of several
        let big: Vec<UsageRecord> = (0..150)
            .map(|i| {
                record(
                    &format!("big{}", i % 100),
                    "ten_c",
                    "tiny",
                    base + 10 + i,
                    1,
                )
            })
            .collect();
        assert_eq!(s.record_usage(&big).await.unwrap(), 100);
        let small = [
            batch[0].clone(),
            record("r5", "ten_c", "tiny", base + 9, 1),
            batch[0].clone(),
        ];
        assert_eq!(s.record_usage(&small).await.unwrap(), 1);
        assert_eq!(s.record_usage(&[]).await.unwrap(), 0);
        assert_eq!(
            s.usage(Some("ten_c"), 0, i64::MAX).await.unwrap().len(),
            101
        );
        let a = s.usage(Some("ten_a"), base, base + 2 * DAY).await.unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], batch[0]);
        assert_eq!(
            s.usage(None, base, base + 2 * DAY).await.unwrap().len(),
            4 + 101
        );
        assert_eq!(
            s.usage(None, base + 2, base + 3).await.unwrap().len(),
            1,
            "[from, to)"
        );
        let sum = s.usage_summary(Some("ten_a"), 0, i64::MAX).await.unwrap();
        let rows: Vec<(&str, &str, i64, i64)> = sum
            .iter()
            .map(|x| {
                (
                    x.day.as_str(),
                    x.model.as_str(),
                    x.requests,
                    x.completion_tokens,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("2026-11-29", "tiny", 2, 8),
                ("2026-11-30", "support", 1, 7)
            ]
        );
        assert_eq!(sum[0].prompt_tokens, 20);
        assert_eq!(sum[0].cached_tokens, 8);
        assert_eq!(sum[0].cost_picodollars, 8_000);
        // budgets count prompt plus completion tokens since a time, by tenant or by key
        let used = s
            .tokens_used_since(Subject::Tenant("ten_a"), base + 2)
            .await
            .unwrap();
        assert_eq!(used, 10 + 5 + 10 + 7);
        let used = s.tokens_used_since(Subject::Key("key_x"), 0).await.unwrap();
        assert_eq!(used, 4 * 10 + 3 + 5 + 7 + 11 + 101 * 11);
        let none = s.tokens_used_since(Subject::Key("key_y"), 0).await.unwrap();
        assert_eq!(none, 0);
    }
}

#[tokio::test]
async fn a_reopened_sqlite_store_keeps_everything_and_bad_urls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = fount_store::Store::open(dir.path(), None).await.unwrap();
    assert_eq!(s.backend(), Backend::Sqlite);
    let t = s.create_tenant("acme").await.unwrap();
    let (key, _) = s
        .create_key(&t.id, "k", &[Scope::Inference], None)
        .await
        .unwrap();
    s.close().await;
    // opening again runs no migration twice and finds the key
    let s = fount_store::Store::open(dir.path(), None).await.unwrap();
    assert!(s.authenticate(&key).await.unwrap().is_some());
    let e = fount_store::Store::connect("mysql://x")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("sqlite://") && e.contains("postgres://"), "{e}");
    let e = fount_store::Store::connect("postgres://nobody@127.0.0.1:1/x").await;
    assert!(e.is_err(), "an unreachable server is an error");
}
