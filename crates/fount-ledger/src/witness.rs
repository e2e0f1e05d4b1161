//! A C2SP `tlog-witness`: it cosigns a log's checkpoint only after checking a consistency proof
//! from the last checkpoint it cosigned for that log, so a log that rewrites history cannot get
//! the rewrite cosigned. Cosignatures are C2SP `tlog-cosignature` v1 (Ed25519).
//!
//! The state (per origin: the size and root last cosigned) is a JSON file replaced whole on
//! every update, checked and written under one lock so two requests cannot roll it back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::log::{hash_lines, key_file, parse_hash_line};
use crate::merkle::{empty_root, verify_consistency, Hash};
use crate::note::{Note, Signer, Verifier, COSIGNATURE};

/// Why a witness refused: the HTTP status, and the body to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 403, 404, 409 or 422, as `tlog-witness` assigns them.
    pub status: u16,
    /// The body: the witness's size and a newline for 409 (`text/x.tlog.size`), else a message.
    pub body: String,
}

fn refuse(status: u16, body: impl Into<String>) -> Refusal {
    Refusal {
        status,
        body: body.into(),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    logs: BTreeMap<String, (u64, String)>,
}

/// A witness: its cosigning key, the logs it follows, and what it last cosigned for each.
#[derive(Debug)]
pub struct Witness {
    signer: Signer,
    logs: Vec<Verifier>,
    state_path: PathBuf,
    state: Mutex<State>,
}

impl Witness {
    /// A witness keeping its key (`witness.key`, created when missing, named `name`) and state
    /// (`witness.json`) in `dir`, following the logs whose verifier keys are `logs`.
    pub fn open(dir: &Path, name: Option<&str>, logs: Vec<Verifier>) -> Result<Witness> {
        let signer = key_file(
            &dir.join("witness.key"),
            name,
            COSIGNATURE,
            "fount.local/witness",
        )?;
        if !signer.verifier().is_cosigner() {
            return Err(Error::Key("witness.key is not a cosignature key".into()));
        }
        let state_path = dir.join("witness.json");
        let state = match fs_err::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Witness {
            signer,
            logs,
            state_path,
            state: Mutex::new(state),
        })
    }

    /// The witness's verifier key (type `0x04`), for logs and clients to trust.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The size this witness last cosigned for `origin`.
    pub fn cosigned_size(&self, origin: &str) -> Option<u64> {
        let st = self.state.lock().ok()?;
        st.logs.get(origin).map(|(s, _)| *s)
    }

    /// Handles an `add-checkpoint` request body; returns the cosignature line(s).
    pub fn add_checkpoint(&self, body: &str, now_s: u64) -> Result<String, Refusal> {
        let (head, note) = body
            .split_once("\n\n")
            .ok_or_else(|| refuse(400, "no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        let old: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("old "))
            .filter(|n| *n == "0" || !n.starts_with('0'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| refuse(400, "the first line is 'old <size>'"))?;
        let proof: Vec<Hash> = lines
            .map(|l| {
                parse_hash_line(l).ok_or_else(|| refuse(400, "a proof line is not a base64 hash"))
            })
            .collect::<Result<_, _>>()?;
        if proof.len() > 63 {
            return Err(refuse(400, "more than 63 proof lines"));
        }
        let parsed = Note::parse(note).map_err(|e| refuse(400, e.to_string()))?;
        let c = Checkpoint::parse(&parsed.text).map_err(|e| refuse(400, e.to_string()))?;
        let keys: Vec<Verifier> = self
            .logs
            .iter()
            .filter(|v| v.name() == c.origin)
            .cloned()
            .collect();
        if keys.is_empty() {
            return Err(refuse(404, format!("unknown log {:?}", c.origin)));
        }
        match parsed.verify(&keys) {
            Ok(ok) if !ok.is_empty() => {}
            Ok(_) => return Err(refuse(403, "no signature by the log's key")),
            Err(e) => return Err(refuse(403, e.to_string())),
        }
        if old > c.size {
            return Err(refuse(400, "the old size is larger than the checkpoint's"));
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| refuse(500, "the witness's state lock is poisoned"))?;
        let (have, root) = st
            .logs
            .get(&c.origin)
            .map(|(s, r)| (*s, r.clone()))
            .unwrap_or((0, String::new()));
        if old != have {
            return Err(refuse(409, format!("{have}\n")));
        }
        if c.size == 0 && c.root != empty_root() {
            return Err(refuse(422, "an empty tree's root is SHA-256 of nothing"));
        }
        if old == 0 {
            if !proof.is_empty() {
                return Err(refuse(422, "a proof from size 0 is empty"));
            }
        } else {
            let old_root = parse_hash_line(&root)
                .ok_or_else(|| refuse(500, "the witness's state is corrupt"))?;
            verify_consistency(old, c.size, &proof, &old_root, &c.root).map_err(|e| {
                refuse(
                    422,
                    format!("not consistent with the size {old} cosigned before: {e}"),
                )
            })?;
        }
        let mut next = State {
            logs: st.logs.clone(),
        };
        next.logs
            .insert(c.origin.clone(), (c.size, B64.encode(c.root)));
        self.persist(&next)
            .map_err(|e| refuse(500, format!("saving the witness's state: {e}")))?;
        *st = next;
        Ok(self.signer.signature_line(&parsed.text, Some(now_s)))
    }

    fn persist(&self, st: &State) -> Result<()> {
        let tmp = self.state_path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = fs_err::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(st)?)?;
            f.sync_all()?;
        }
        fs_err::rename(&tmp, &self.state_path)?;
        Ok(())
    }
}

/// The body of an `add-checkpoint` request.
pub fn add_checkpoint_body(old: u64, proof: &[Hash], checkpoint: &str) -> String {
    format!("old {old}\n{}\n{checkpoint}", hash_lines(proof))
}

/// Checks a witness's response against its key; returns the cosignature lines to add.
pub fn check_cosignatures(
    checkpoint: &str,
    response: &str,
    witness: &Verifier,
) -> Result<Vec<String>> {
    let n = Note::parse(checkpoint)?;
    let joined = format!("{}\n{response}", n.text);
    let resp = Note::parse(&joined)?;
    let ok = resp.verify(std::slice::from_ref(witness))?;
    if ok.is_empty() {
        return Err(Error::Note(format!("no cosignature by {}", witness.name())));
    }
    Ok(resp
        .sigs
        .into_iter()
        .filter(|s| s.name == witness.name())
        .map(|s| s.line)
        .collect())
}
