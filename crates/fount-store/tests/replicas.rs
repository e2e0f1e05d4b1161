use std::sync::Arc;

use fount_store::{now_ms, Admission, Scope, UsageKind, UsageRecord, Wants, ABANDONED_STATUS};

use crate::util::stores;

fn record(id: &str, tenant: &str, key: &str, tokens: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        tenant_id: tenant.into(),
        key_id: key.into(),
        model: "m".into(),
        adapter: None,
        prompt_tokens: tokens,
        cached_tokens: 0,
        completion_tokens: 0,
        status: 200,
        latency_ms: 1,
        created_at_ms: now_ms(),
        cost_picodollars: 0,
        kind: UsageKind::Inference,
        slot_ms: 0,
    }
}

#[tokio::test]
async fn concurrent_admissions_from_several_replicas_charge_one_window() {
    for (s, _dir) in stores("shared_quota").await {
        let b = s.backend();
        let t = s.create_tenant("acme").await.unwrap();
        let (_, key) = s
            .create_key(&t.id, "ci", &[Scope::Inference], None)
            .await
            .unwrap();
        let s = Arc::new(s);
        let now = now_ms();
        // 90 requests from three "replicas" at once against 40 a minute and 3 open at a time
        let mut tasks = Vec::new();
        for i in 0..90 {
            let (s, tenant, key) = (s.clone(), t.id.clone(), key.id.clone());
            tasks.push(tokio::spawn(async move {
                let id = format!("req-{i}");
                let replica = format!("rep-{}", i % 3);
                let a = Admission {
                    request_id: &id,
                    replica_id: &replica,
                    tenant_id: &tenant,
                    key_id: &key,
                    model: "m",
                    tokens: 10,
                    now_ms: now,
                    wants: [
                        Wants {
                            minute: true,
                            concurrent: true,
                            day: true,
                            month: false,
                        },
                        Wants::default(),
                    ],
                };
                s.admit_shared(&a, |c| {
                    let c = &c[0];
                    if c.minute_requests >= 40 || c.in_flight >= 30 {
                        Err(c.clone())
                    } else {
                        Ok(())
                    }
                })
                .await
                .unwrap()
                .is_ok()
                .then_some((id, replica))
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await.unwrap());
        }
        let admitted = ids.len();
        // serialised by the tenant's lock: exactly the open limit
        assert_eq!(admitted, 30, "{b:?}");
        assert_eq!(s.open_requests().await.unwrap(), admitted as i64, "{b:?}");
        // what a later admission reads: the minute, the open requests and the day's reservations
        let probe = Admission {
            request_id: "probe",
            replica_id: "rep-0",
            tenant_id: &t.id,
            key_id: &key.id,
            model: "m",
            tokens: 5,
            now_ms: now,
            wants: [
                Wants {
                    minute: true,
                    concurrent: true,
                    day: true,
                    month: true,
                },
                Wants::default(),
            ],
        };
        let seen = s
            .admit_shared(&probe, |c| Err(c[0].clone()))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(seen.minute_requests, admitted as i64, "{b:?}");
        assert_eq!(seen.minute_tokens, 10 * admitted as i64, "{b:?}");
        assert_eq!(seen.in_flight, admitted as i64, "{b:?}");
        assert_eq!(seen.day, Some((0, 10 * admitted as i64)), "{b:?}");
        assert_eq!(seen.oldest_second, Some(now.div_euclid(1000)), "{b:?}");

        if b == fount_store::Backend::Postgres {
            // the record's transaction closes the open request: used moves, reserved falls
            let (done, done_on) = &ids[0];
            s.record_usage(&[record(done, &t.id, &key.id, 7)])
                .await
                .unwrap();
            let seen = s
                .admit_shared(&probe, |c| Err(c[0].clone()))
                .await
                .unwrap()
                .unwrap_err();
            let open = admitted as i64 - 1;
            assert_eq!(seen.in_flight, open, "{b:?}");
            assert_eq!(seen.day, Some((7, 10 * open)), "{b:?}");

            // replica 1 dies: its open requests are recorded once, as abandoned, billed nothing
            for r in 0..3 {
                s.join_replica(&format!("rep-{r}"), "127.0.0.1:1", now)
                    .await
                    .unwrap();
            }
            for r in [0, 2] {
                assert!(s
                    .heartbeat(&format!("rep-{r}"), now + 10_000)
                    .await
                    .unwrap());
            }
            let (a, b2) = tokio::join!(
                s.sweep(now + 5_000, now + 10_000),
                s.sweep(now + 5_000, now + 10_000)
            );
            let swept = a.unwrap() + b2.unwrap();
            let on_dead = ids[1..].iter().filter(|(_, r)| r == "rep-1").count() as u64;
            assert!(on_dead > 0 && done_on.starts_with("rep-"));
            assert_eq!(
                swept, on_dead,
                "one record for each of the dead replica's requests"
            );
            assert!(!s.heartbeat("rep-1", now + 11_000).await.unwrap());
            let records = s.usage(Some(&t.id), 0, i64::MAX).await.unwrap();
            let abandoned: Vec<_> = records
                .iter()
                .filter(|r| r.status == ABANDONED_STATUS)
                .collect();
            assert_eq!(abandoned.len() as u64, on_dead);
            assert!(abandoned
                .iter()
                .all(|r| r.prompt_tokens == 0 && r.cost_picodollars == 0));
            assert_eq!(s.open_requests().await.unwrap(), open - on_dead as i64);
            assert_eq!(s.replicas(now + 5_000).await.unwrap().len(), 2);
            s.leave_replica("rep-0").await.unwrap();
            assert_eq!(s.replicas(0).await.unwrap().len(), 1);
        }
    }
}

#[tokio::test]
async fn the_adapter_registry_versions_every_change() {
    for (s, _dir) in stores("registry").await {
        let b = s.backend();
        let v0 = s.registry_version().await.unwrap();
        let v1 = s
            .registry_put("ten_1/sql", "adapters/ten_1/sql/ab12", Some("ab12"), 1)
            .await
            .unwrap();
        let v2 = s
            .registry_put("public", "/srv/public", None, 2)
            .await
            .unwrap();
        assert!(v0 < v1 && v1 < v2, "{b:?}");
        let all = s.registry_since(v0).await.unwrap();
        assert_eq!(all.len(), 2, "{b:?}");
        assert_eq!(all[0].digest.as_deref(), Some("ab12"));
        assert!(s.registry_remove("public", 3).await.unwrap());
        assert!(!s.registry_remove("public", 4).await.unwrap(), "{b:?}");
        assert!(!s.registry_remove("never", 4).await.unwrap(), "{b:?}");
        let changed = s.registry_since(v2).await.unwrap();
        assert_eq!(changed.len(), 1, "{b:?}");
        assert!(changed[0].removed);
        assert_eq!(s.registry_version().await.unwrap(), changed[0].version);
        // registering it again brings it back
        s.registry_put("public", "/srv/public2", None, 5)
            .await
            .unwrap();
        let back = s.registry_since(changed[0].version).await.unwrap();
        assert_eq!(back.len(), 1);
        assert!(!back[0].removed && back[0].location == "/srv/public2");
    }
}
