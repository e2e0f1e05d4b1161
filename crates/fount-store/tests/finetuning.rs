use fount_store::{
    ft_id, Ask, Change, FtCheckpoint, FtEvent, FtJob, FtStatus, FtUpdate, JobState, NewJob,
    Priority, Stop, Transition, UsageKind, UsageRecord,
};

use crate::util::stores;

fn ft_job(tenant: &str, at: i64) -> FtJob {
    FtJob {
        id: ft_id("ftjob"),
        tenant_id: tenant.into(),
        model: "tiny".into(),
        training_file: "file-a".into(),
        validation_file: None,
        suffix: Some("s".into()),
        seed: 7,
        method: "{}".into(),
        metadata: None,
        status: FtStatus::ValidatingFiles,
        error: None,
        pool_job_id: None,
        out_dir: format!("/ft/{at}"),
        fine_tuned_model: None,
        billable_tokens: None,
        total_steps: None,
        trained_tokens: None,
        result_file: None,
        created_at_ms: at,
        finished_at_ms: None,
    }
}

fn event(job: &str, key: &str, at: i64) -> FtEvent {
    FtEvent {
        id: ft_id("ftevent"),
        job_id: job.into(),
        key: key.into(),
        created_at_ms: at,
        level: "info".into(),
        message: key.into(),
        kind: "message".into(),
        data: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fine_tuning_jobs_page_newest_first_privately_and_change_by_compare_and_set() {
    for (s, _dir) in stores("ft-jobs").await {
        let b = s.backend();
        let acme = s.create_tenant("acme").await.unwrap();
        let other = s.create_tenant("other").await.unwrap();
        let jobs: Vec<FtJob> = (0..5).map(|i| ft_job(&acme.id, 1000 + i)).collect();
        for j in &jobs {
            s.insert_ft_job(j).await.unwrap();
        }
        // newest first, `after` the last of a page, until `has_more` is false
        let (p1, more) = s.ft_jobs(&acme.id, None, 2).await.unwrap();
        assert!(more, "{b:?}");
        let ids = |p: &[FtJob]| p.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&p1), [jobs[4].id.clone(), jobs[3].id.clone()]);
        let (p2, _) = s.ft_jobs(&acme.id, Some(&p1[1].id), 2).await.unwrap();
        let (p3, more) = s.ft_jobs(&acme.id, Some(&p2[1].id), 2).await.unwrap();
        assert_eq!(ids(&p3), [jobs[0].id.clone()]);
        assert!(!more);
        // another tenant sees none of them, and cannot page from one
        assert!(s.ft_job(&other.id, &jobs[0].id).await.unwrap().is_none());
        assert!(s.ft_jobs(&other.id, None, 10).await.unwrap().0.is_empty());
        assert!(s.ft_jobs(&other.id, Some(&jobs[0].id), 10).await.is_err());
        // a change from a status the job has left is refused
        let to_queued = FtUpdate {
            status: Some(FtStatus::Queued),
            total_steps: Some(30),
            ..FtUpdate::default()
        };
        assert!(s
            .update_ft_job(&jobs[0].id, FtStatus::ValidatingFiles, &to_queued)
            .await
            .unwrap());
        assert!(!s
            .update_ft_job(&jobs[0].id, FtStatus::ValidatingFiles, &to_queued)
            .await
            .unwrap());
        let j = s.ft_job(&acme.id, &jobs[0].id).await.unwrap().unwrap();
        assert_eq!(
            (j.status, j.total_steps, j.finished_at_ms),
            (FtStatus::Queued, Some(30), None)
        );
        assert_eq!(s.live_ft_jobs().await.unwrap().len(), 5);
        // success writes its bill in the same transaction, once
        let bill = UsageRecord {
            request_id: format!("{}.trained", j.id),
            tenant_id: acme.id.clone(),
            key_id: String::new(),
            model: "tiny".into(),
            adapter: Some("ft:tiny:acme:s:x".into()),
            prompt_tokens: 1234,
            cached_tokens: 0,
            completion_tokens: 0,
            status: 200,
            latency_ms: 1,
            created_at_ms: 5000,
            cost_picodollars: 1234 * 3_000_000,
            kind: UsageKind::Training,
            slot_ms: 0,
        };
        let done = FtUpdate {
            status: Some(FtStatus::Succeeded),
            fine_tuned_model: Some("ft:tiny:acme:s:x".into()),
            trained_tokens: Some(1234),
            usage: Some(bill.clone()),
            ..FtUpdate::default()
        };
        assert!(s
            .update_ft_job(&j.id, FtStatus::Queued, &done)
            .await
            .unwrap());
        assert!(!s
            .update_ft_job(&j.id, FtStatus::Queued, &done)
            .await
            .unwrap());
        let j = s.ft_job(&acme.id, &j.id).await.unwrap().unwrap();
        assert!(j.finished_at_ms.is_some() && j.trained_tokens == Some(1234));
        let usage = s.usage(Some(&acme.id), 0, i64::MAX).await.unwrap();
        assert_eq!(usage, [bill]);
        assert_eq!(s.live_ft_jobs().await.unwrap().len(), 4);
        let models = s.ft_models(0).await.unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(
            (models[0].name.as_str(), models[0].path.as_str()),
            ("ft:tiny:acme:s:x", "/ft/1000")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_are_written_once_per_key_and_checkpoints_once_per_step() {
    for (s, _dir) in stores("ft-events").await {
        let acme = s.create_tenant("acme").await.unwrap();
        let j = ft_job(&acme.id, 1);
        s.insert_ft_job(&j).await.unwrap();
        for i in 0..7 {
            assert!(s
                .add_ft_event(&event(&j.id, &format!("k{i}"), 100 + i))
                .await
                .unwrap());
        }
        // a second follower writing the same event: ignored
        assert!(!s.add_ft_event(&event(&j.id, "k3", 999)).await.unwrap());
        let (page, more) = s.ft_events(&j.id, None, 3).await.unwrap();
        assert!(more);
        let keys = |p: &[FtEvent]| p.iter().map(|e| e.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&page), ["k6", "k5", "k4"]);
        let (page, _) = s.ft_events(&j.id, Some(&page[2].id), 10).await.unwrap();
        assert_eq!(keys(&page), ["k3", "k2", "k1", "k0"]);
        assert!(s.ft_events(&j.id, Some("ftevent-nope"), 10).await.is_err());
        assert_eq!(s.ft_event_keys(&j.id).await.unwrap().len(), 7);
        for step in [10, 20, 30] {
            let c = FtCheckpoint {
                id: ft_id("ftckpt"),
                job_id: j.id.clone(),
                step,
                model: format!("ft:x:ckpt-step-{step}"),
                path: format!("/c/{step}"),
                metrics: "{}".into(),
                created_at_ms: step,
            };
            assert!(s.add_ft_checkpoint(&c).await.unwrap());
            assert!(!s
                .add_ft_checkpoint(&FtCheckpoint {
                    id: ft_id("ftckpt"),
                    ..c
                })
                .await
                .unwrap());
        }
        let (page, more) = s.ft_checkpoints(&j.id, None, 2).await.unwrap();
        assert_eq!(page.iter().map(|c| c.step).collect::<Vec<_>>(), [30, 20]);
        assert!(more);
        let (page, more) = s.ft_checkpoints(&j.id, Some(&page[1].id), 2).await.unwrap();
        assert_eq!(page.iter().map(|c| c.step).collect::<Vec<_>>(), [10]);
        assert!(!more);
        // checkpoints are models of their tenant
        assert_eq!(s.ft_models(0).await.unwrap().len(), 3);
        assert_eq!(s.ft_models(25).await.unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owners_pause_resume_and_cancel_jobs_in_any_live_state() {
    for (s, _dir) in stores("jobs-ask").await {
        let t = s.create_tenant("acme").await.unwrap();
        let new = |out: &str| NewJob {
            tenant_id: t.id.clone(),
            name: None,
            priority: Priority::Normal,
            kind: "finetune".into(),
            command: vec!["finetune".into()],
            cwd: "/".into(),
            out_dir: out.into(),
            done_marker: format!("{out}/done"),
            time_limit_s: None,
            log_path: "/tmp/{id}.log".into(),
        };
        // a waiting job is paused and resumed at once
        let j = s.submit_job(&new("/o/1")).await.unwrap();
        let (p, now) = s.ask_job(&j.id, Ask::Pause).await.unwrap();
        assert_eq!((p.state, now), (JobState::Paused, true));
        // a paused job still owns its directory
        assert!(s.submit_job(&new("/o/1")).await.is_err());
        assert!(s.ask_job(&j.id, Ask::Pause).await.is_err());
        let (q, _) = s.ask_job(&j.id, Ask::Resume).await.unwrap();
        assert_eq!(q.state, JobState::Queued);
        assert!(s.ask_job(&j.id, Ask::Resume).await.is_err());
        // a running one is asked to stop at a checkpoint; the pool records the pause
        let r = s
            .transition_job(&q, &Change::new(Transition::Start, "started"))
            .await
            .unwrap();
        assert_eq!(r.state, JobState::Running);
        let (r, now) = s.ask_job(&j.id, Ask::Pause).await.unwrap();
        assert_eq!(
            (r.state, r.stop.map(|x| x.0), now),
            (JobState::Running, Some(Stop::Pause), false)
        );
        // a resume before it stopped is refused; a cancel replaces the pause
        assert!(s.ask_job(&j.id, Ask::Resume).await.is_err());
        let (r, _) = s.ask_job(&j.id, Ask::Cancel).await.unwrap();
        assert_eq!(r.stop.map(|x| x.0), Some(Stop::Cancel));
        let p = s
            .transition_job(&r, &Change::new(Transition::Cancel, "cancelled"))
            .await
            .unwrap();
        assert_eq!(p.state, JobState::Cancelled);
        assert!(s.ask_job(&j.id, Ask::Cancel).await.is_err());
        // a paused job can be cancelled; its attempt's slot time was billed when it stopped
        let k = s.submit_job(&new("/o/2")).await.unwrap();
        let k = s
            .transition_job(&k, &Change::new(Transition::Start, "started"))
            .await
            .unwrap();
        s.ask_job(&k.id, Ask::Pause).await.unwrap();
        let k = s.job(&k.id).await.unwrap().unwrap();
        let k = s
            .transition_job(&k, &Change::new(Transition::Pause, "paused; checkpointed"))
            .await
            .unwrap();
        assert_eq!(k.state, JobState::Paused);
        let (c, _) = s.ask_job(&k.id, Ask::Cancel).await.unwrap();
        assert_eq!(c.state, JobState::Cancelled);
        let history: Vec<_> = s
            .job_history(&k.id)
            .await
            .unwrap()
            .iter()
            .map(|h| h.state)
            .collect();
        assert_eq!(
            history,
            [
                JobState::Queued,
                JobState::Running,
                JobState::Paused,
                JobState::Cancelled
            ]
        );
        assert!(s.ask_job("job-nope", Ask::Cancel).await.is_err());
    }
}
