//! A throwaway PostgreSQL cluster of a test's own (initdb + pg_ctl, as scripts/test.sh starts
//! one), for tests that need server settings the shared one lacks (TLS). Running as root, the
//! cluster belongs to the `postgres` user (initdb refuses root). Stopped (immediate mode) and
//! removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    pg_ctl: PathBuf,
    as_postgres: bool,
}

/// A PostgreSQL server binary: on the PATH, else the newest `/usr/lib/postgresql/*/bin`.
fn pg_bin(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found (install postgresql)"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// Runs `program args` as the cluster's owner.
    fn run(&self, program: &Path, args: &[&str]) -> std::process::Output {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).current_dir(&self.dir).output().unwrap()
    }

    /// Gives `path` to the cluster's owner with `mode`.
    pub fn own(&self, path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        if self.as_postgres {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(path)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Initialises a cluster (trust authentication, superuser `postgres`, database `test`);
    /// `setup` may write files into the data directory and returns extra server settings
    /// (`-c name=value` pairs) and the `pg_hba.conf` to use.
    pub fn start(setup: impl FnOnce(&PgCluster, &Path) -> (Vec<String>, String)) -> PgCluster {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("threadgate-pg-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = PgCluster {
            port: crate::harness::free_port(),
            dir: dir.clone(),
            pg_ctl: pg_bin("pg_ctl"),
            as_postgres: is_root(),
        };
        c.own(&dir, 0o755);
        let data = dir.join("data");
        let initdb = pg_bin("initdb");
        let out = c.run(
            &initdb,
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (settings, hba) = setup(&c, &data);
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        c.own(&data.join("pg_hba.conf"), 0o600);
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1,127.0.0.2 -p {} -k {} -c fsync=off -c max_connections=50",
            c.port,
            dir.display()
        );
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        let log = dir.join("server.log");
        let out = c.run(
            &c.pg_ctl.clone(),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Database `test`, over the Unix socket (pg_hba may allow only TLS on TCP).
        let psql = pg_bin("psql");
        let out = c.run(
            &psql,
            &[
                "-h",
                dir.to_str().unwrap(),
                "-p",
                &c.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Xqc",
                "CREATE DATABASE test",
            ],
        );
        assert!(
            out.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.run(
            &self.pg_ctl.clone(),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
