use fount_store::{AuditRecord, Scope, Subject, SuspendKind};

use crate::util::stores;

#[tokio::test]
async fn policies_suspensions_and_audit_records_round_trip() {
    for (s, _dir) in stores("safety").await {
        let b = s.backend();
        let t = s.create_tenant("acme").await.unwrap();
        let (_, key) = s
            .create_key(&t.id, "ci", &[Scope::Inference], None)
            .await
            .unwrap();
        let v0 = s.safety_version().await.unwrap();

        s.set_policy(Subject::Tenant(&t.id), "[input]\nblock = [\"hate\"]\n")
            .await
            .unwrap();
        s.set_policy(Subject::Key(&key.id), "[output]\nredact_pii = true\n")
            .await
            .unwrap();
        s.set_policy(Subject::Tenant(&t.id), "[input]\nblock = [\"pii\"]\n")
            .await
            .unwrap();
        let p = s.policies().await.unwrap();
        assert_eq!(p.len(), 2, "{b:?}: one policy per subject");
        assert!(p.contains(&(format!("t:{}", t.id), "[input]\nblock = [\"pii\"]\n".into())));
        assert!(
            s.set_policy(Subject::Tenant("nobody"), "").await.is_err(),
            "{b:?}"
        );
        assert!(s.clear_policy(Subject::Key(&key.id)).await.unwrap());
        assert!(!s.clear_policy(Subject::Key(&key.id)).await.unwrap());

        assert!(s
            .suspend(SuspendKind::Adapter, "sql-lora", "misuse")
            .await
            .unwrap());
        assert!(!s
            .suspend(SuspendKind::Adapter, "sql-lora", "again")
            .await
            .unwrap());
        assert!(s
            .suspend(SuspendKind::Tenant, &t.id, "unpaid")
            .await
            .unwrap());
        let sus = s.suspensions().await.unwrap();
        assert_eq!(sus.len(), 2);
        assert_eq!(
            (sus[1].kind, sus[1].reason.as_str()),
            (SuspendKind::Tenant, "unpaid")
        );
        assert!(s.resume(SuspendKind::Tenant, &t.id).await.unwrap());
        assert!(!s.resume(SuspendKind::Tenant, &t.id).await.unwrap());
        assert_eq!(s.suspensions().await.unwrap().len(), 1);
        assert!(
            s.safety_version().await.unwrap() > v0 + 5,
            "{b:?}: every change bumps the version"
        );

        let rec = |id: &str, at: i64, tenant: Option<&str>| AuditRecord {
            id: id.into(),
            created_at_ms: at,
            tenant_id: tenant.map(str::to_string),
            key_id: None,
            request_id: Some("chatcmpl-1".into()),
            stage: "input".into(),
            action: "block".into(),
            categories: "[\"hate\"]".into(),
            rules: "[\"hate#1\"]".into(),
            policy: format!("t:{}", t.id),
            content_sha256: "00".repeat(32),
            content: None,
        };
        let records = [
            rec("aud-2", 2000, Some(&t.id)),
            rec("aud-1", 1000, None),
            rec("aud-3", 3000, Some(&t.id)),
        ];
        s.record_audit(&records).await.unwrap();
        let all = s.audit(0, 10_000, None).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["aud-1", "aud-2", "aud-3"]
        );
        assert_eq!(all[1], records[0]);
        let mine = s.audit(2000, 3000, Some(&t.id)).await.unwrap();
        assert_eq!(mine.len(), 1, "{b:?}: the window is half-open");
        // an id is written once
        assert!(s.record_audit(&records[..1]).await.is_err());
    }
}
