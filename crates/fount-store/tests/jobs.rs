use fount_store::{
    Change, JobFilter, JobQuota, JobState, NewJob, Priority, Stop, Store, Transition, UsageKind,
};
use rand::{Rng, SeedableRng};

use crate::util::stores;

fn new_job(tenant: &str, out: &str) -> NewJob {
    NewJob {
        tenant_id: tenant.into(),
        name: Some("t".into()),
        priority: Priority::Normal,
        kind: "finetune".into(),
        command: vec!["finetune".into(), "--out".into(), out.into()],
        cwd: "/".into(),
        out_dir: out.into(),
        done_marker: format!("{out}/adapter_config.json"),
        time_limit_s: None,
        log_path: "/tmp/{id}.log".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_submitted_once_per_output_and_refused_for_unknown_tenants() {
    for (s, _dir) in stores("jobs-submit").await {
        let b = s.backend();
        let t = s.create_tenant("acme").await.unwrap();
        let j = s.submit_job(&new_job(&t.id, "/out/a")).await.unwrap();
        assert!(j.id.starts_with("job-"), "{}", j.id);
        assert_eq!(
            (j.state, j.attempts, j.reason.as_str()),
            (JobState::Queued, 0, "submitted")
        );
        assert_eq!(j.log_path, format!("/tmp/{}.log", j.id));
        assert_eq!(j.command, ["finetune", "--out", "/out/a"]);
        // another live job writing the same directory is refused, naming the first
        let e = s.submit_job(&new_job(&t.id, "/out/a")).await.unwrap_err();
        assert!(e.to_string().contains(&j.id), "{e}");
        let e = s
            .submit_job(&new_job("ten_nope", "/out/b"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        assert_eq!(s.jobs(&JobFilter::default()).await.unwrap().len(), 1);
        // once the first is over, the directory is free again
        s.transition_job(&j, &Change::new(Transition::Cancel, "cancelled"))
            .await
            .unwrap();
        s.submit_job(&new_job(&t.id, "/out/a")).await.unwrap();
        // eight submits of one directory at once: exactly one is queued
        let racing: Vec<_> = (0..8)
            .map(|_| {
                let (s, job) = (s.clone(), new_job(&t.id, "/out/race"));
                tokio::spawn(async move { s.submit_job(&job).await })
            })
            .collect();
        let mut queued = 0;
        for r in racing {
            match r.await.unwrap() {
                Ok(_) => queued += 1,
                Err(e) => assert!(e.to_string().contains("already writes"), "{b:?}: {e}"),
            }
        }
        assert_eq!(queued, 1, "{b:?}");
    }
}

#[tokio::test]
async fn an_attempt_is_billed_once_and_stale_changes_are_refused() {
    for (s, _dir) in stores("jobs-attempts").await {
        let b = s.backend();
        let t = s.create_tenant("acme").await.unwrap();
        let q = s.submit_job(&new_job(&t.id, "/out/x")).await.unwrap();
        let r = s
            .transition_job(
                &q,
                &Change {
                    executor: Some("local"),
                    ..Change::new(Transition::Start, "started")
                },
            )
            .await
            .unwrap();
        assert_eq!((r.state, r.attempts), (JobState::Running, 1));
        assert!(s.set_job_handle(&r.id, 1, "123:456").await.unwrap());
        assert!(!s.set_job_handle(&r.id, 2, "9:9").await.unwrap(), "{b:?}");
        // a change computed from the queued record is stale now
        let e = s
            .transition_job(&q, &Change::new(Transition::Start, "again"))
            .await
            .unwrap_err();
        assert!(matches!(e, fount_store::Error::Conflict(_)), "{e}");
        // a stop is asked, signalled once, and ends with the attempt
        assert!(s.request_job_stop(&r.id, 1, Stop::Preempt).await.unwrap());
        assert!(!s.request_job_stop(&r.id, 1, Stop::Budget).await.unwrap());
        assert!(s.mark_job_signalled(&r.id, 1).await.unwrap());
        assert!(!s.mark_job_signalled(&r.id, 1).await.unwrap());
        let r = s.job(&r.id).await.unwrap().unwrap();
        assert!(
            matches!(r.stop, Some((Stop::Preempt, Some(_)))),
            "{:?}",
            r.stop
        );
        let start = r.started_at_ms.unwrap();
        let p = s
            .transition_job(
                &r,
                &Change {
                    exit_status: Some(75),
                    at_ms: Some(start + 2_500),
                    ..Change::new(Transition::Preempt, "preempted")
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (p.state, p.slot_ms, p.stop),
            (JobState::Preempted, 2_500, None)
        );
        // writing the same end again is refused and bills nothing more
        assert!(s
            .transition_job(&r, &Change::new(Transition::Preempt, "again"))
            .await
            .is_err());
        let usage = s.usage(Some(&t.id), 0, i64::MAX).await.unwrap();
        assert_eq!(usage.len(), 1, "{b:?}");
        let u = &usage[0];
        assert_eq!(u.request_id, format!("{}.1", p.id));
        assert_eq!(
            (u.kind, u.slot_ms, u.status),
            (UsageKind::Training, 2_500, 75)
        );
        assert!(u.csv_row().ends_with(",training,2.500"), "{}", u.csv_row());
        assert_eq!(s.slot_ms_since(0).await.unwrap(), [(t.id.clone(), 2_500)]);
        // tokens budgets ignore slot time
        assert_eq!(
            s.tokens_used_since(fount_store::Subject::Tenant(&t.id), 0)
                .await
                .unwrap(),
            0
        );
        let history: Vec<JobState> = s
            .job_history(&p.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(
            history,
            [JobState::Queued, JobState::Running, JobState::Preempted]
        );
    }
}

#[tokio::test]
async fn job_quotas_round_trip() {
    for (s, _dir) in stores("jobs-quota").await {
        let t = s.create_tenant("acme").await.unwrap();
        assert_eq!(s.job_quota(&t.id).await.unwrap(), JobQuota::default());
        let q = JobQuota {
            running_jobs: Some(2),
            slot_seconds_per_day: Some(3600),
            slot_seconds_per_month: None,
            max_priority: Some(Priority::Normal),
        };
        s.set_job_quota(&t.id, &q).await.unwrap();
        assert_eq!(s.job_quota(&t.id).await.unwrap(), q);
        assert!(s.set_job_quota("ten_nope", &q).await.is_err());
    }
}

#[tokio::test]
async fn one_pool_holds_the_lease() {
    for (s, _dir) in stores("jobs-lease").await {
        assert!(s.take_pool_lease("a", 60_000, |_| false).await.unwrap());
        assert!(s.take_pool_lease("a", 60_000, |_| false).await.unwrap());
        assert!(!s.take_pool_lease("b", 60_000, |_| false).await.unwrap());
        // a holder known to be dead loses it at once
        assert!(s.take_pool_lease("b", 60_000, |h| h == "a").await.unwrap());
        s.release_pool_lease("b").await.unwrap();
        assert!(s.take_pool_lease("c", 1, |_| false).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // expired
        assert!(s.take_pool_lease("d", 60_000, |_| false).await.unwrap());
    }
}

/// Random sequences of changes, applied to the stored job: each is accepted exactly when the
/// state machine allows it from the stored state, a refused one changes nothing, and the
/// history is exactly the accepted states.
async fn random_walks(s: &Store, tenant: &str, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for walk in 0..40 {
        let mut job = s
            .submit_job(&new_job(tenant, &format!("/walk/{seed}/{walk}")))
            .await
            .unwrap();
        let mut states = vec![JobState::Queued];
        for _ in 0..8 {
            let t = Transition::ALL[rng.random_range(0..Transition::ALL.len())];
            let want = fount_store::jobs::next(job.state, t);
            match s.transition_job(&job, &Change::new(t, "walk")).await {
                Ok(after) => {
                    assert_eq!(Some(after.state), want, "{:?} {t:?}", job.state);
                    states.push(after.state);
                    job = after;
                }
                Err(e) => {
                    assert_eq!(want, None, "{:?} {t:?}: {e}", job.state);
                    assert_eq!(s.job(&job.id).await.unwrap().unwrap(), job);
                }
            }
        }
        let history: Vec<JobState> = s
            .job_history(&job.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(history, states);
    }
}

#[tokio::test]
async fn every_random_sequence_of_changes_follows_the_machine() {
    for (s, _dir) in stores("jobs-walk").await {
        let t = s.create_tenant("acme").await.unwrap();
        for seed in 0..3 {
            random_walks(&s, &t.id, seed).await;
        }
    }
}
