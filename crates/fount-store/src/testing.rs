//! Test support (feature `testing`): a throwaway PostgreSQL cluster started once per test
//! binary and stopped when it exits, and fresh stores on both databases.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::Store;

/// A running throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
}

impl Postgres {
    fn pg(&self, tool: &str) -> Command {
        as_postgres(&self.bin.join(tool))
    }
}

/// `postgres` refuses to run as root: run its tools as the `postgres` user then.
fn as_postgres(tool: &Path) -> Command {
    let root = std::env::var("USER").is_ok_and(|u| u == "root")
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = fs_err::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!("PostgreSQL is not installed (scripts/test installs it from Debian's packages)")
        })
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster of this test binary.
pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("fount-pg-{}", std::process::id()));
        let _ = fs_err::remove_dir_all(&dir);
        fs_err::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        // the postgres user must own the cluster directory
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("{e}"))
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let pg = Postgres { port, bin };
        let data = dir.join("data");
        let mut init = pg.pg("initdb");
        init.args(["-U", "fount", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(&data);
        run(init, "initdb");
        let mut start = pg.pg("pg_ctl");
        start
            .args(["-D"])
            .arg(&data)
            .args(["-l"])
            .arg(dir.join("log"))
            .args(["-w", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.display()
            ))
            .arg("start");
        run(start, "pg_ctl start");
        // stop the cluster when the test binary exits
        extern "C" fn stop() {
            if let Some(pg) = PG_STOP.get() {
                let mut c = as_postgres(&pg.0.join("pg_ctl"));
                let _ = c
                    .args(["-D"])
                    .arg(&pg.1)
                    .args(["-m", "immediate", "stop"])
                    .output();
                let _ = fs_err::remove_dir_all(&pg.2);
            }
        }
        static PG_STOP: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
        let _ = PG_STOP.set((pg.bin.clone(), data, dir));
        // SAFETY: registering a plain function to run at exit.
        #[allow(unsafe_code)]
        unsafe {
            atexit(stop);
        }
        pg
    })
}

extern "C" {
    fn atexit(f: extern "C" fn()) -> i32;
}

/// The URL of a fresh database in the cluster.
///
/// # Panics
/// When PostgreSQL is missing or does not start: this is test support.
pub fn postgres_url(name: &str) -> String {
    let pg = postgres();
    let db = format!("t_{name}_{}", rand_suffix());
    let mut c = pg.pg("createdb");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port.to_string(),
        "-U",
        "fount",
        &db,
    ]);
    run(c, "createdb");
    format!("postgres://fount@127.0.0.1:{}/{db}", pg.port)
}

/// A fresh database in the cluster.
///
/// # Panics
/// When PostgreSQL is missing or does not start: this is test support.
pub async fn postgres_store(name: &str) -> Store {
    Store::connect(&postgres_url(name))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn rand_suffix() -> String {
    format!("{:x}", rand::random::<u32>())
}

/// Both stores, fresh: SQLite in a temporary directory (kept while the returned guard lives),
/// and PostgreSQL.
///
/// # Panics
/// When either cannot be opened: this is test support.
pub async fn stores(name: &str) -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sqlite = Store::open(dir.path(), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    vec![(sqlite, Some(dir)), (postgres_store(name).await, None)]
}

/// Runs one SQL statement as it is: tests that tamper with stored rows, as an operator with
/// access to the database could.
pub async fn execute(store: &Store, sql: &str) -> crate::Result<u64> {
    Ok(sqlx::query(sql).execute(&store.pool).await?.rows_affected())
}
