//! The chat task: rewrite a date `YYYY-MM-DD` as `DD/MM/YYYY`, in OpenAI chat JSONL, over every
//! calendar day of 1950–2039, with a held-out file of dates never seen in training.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::error::Result;

/// The instruction of the chat task for one date.
pub fn chat_prompt(date: &str) -> String {
    format!("Rewrite the date {date} in the format DD/MM/YYYY.")
}

/// The correct answer of the chat task for a `YYYY-MM-DD` date.
pub fn chat_answer(date: &str) -> Option<String> {
    let mut it = date.split('-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    Some(format!("{d}/{m}/{y}"))
}

/// Days from 1970-01-01 to 1950-01-01 and to 2040-01-01: the task's dates lie between.
const CHAT_DAYS: std::ops::Range<i64> = -7305..25567;

/// The `YYYY-MM-DD` date `days` days after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `n` distinct dates drawn uniformly from every calendar day of 1950–2039 (days 29, 30 and 31
/// where the month has them, 29 February in leap years), in draw order.
fn chat_dates(n: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0c4a_7000);
    let n = n.min((CHAT_DAYS.end - CHAT_DAYS.start) as usize);
    let mut seen = std::collections::HashSet::new();
    let mut dates = Vec::with_capacity(n);
    while dates.len() < n {
        let day = rng.random_range(CHAT_DAYS);
        if seen.insert(day) {
            dates.push(civil_date(day));
        }
    }
    dates
}

pub(super) fn synth_chat(dir: &Path, n: usize, seed: u64) -> Result<(PathBuf, PathBuf)> {
    let dates = chat_dates(n, seed);
    let test_n = (n / 6).max(1).min(n);
    let train_path = dir.join("train.jsonl");
    let test_path = dir.join("test.jsonl");
    let mut train = std::io::BufWriter::new(fs_err::File::create(&train_path)?);
    let mut test = std::io::BufWriter::new(fs_err::File::create(&test_path)?);
    for (i, date) in dates.iter().enumerate() {
        let answer = chat_answer(date).unwrap_or_default();
        let rec = json!({ "messages": [
            { "role": "user", "content": chat_prompt(date) },
            { "role": "assistant", "content": answer },
        ]});
        let w = if i < test_n { &mut test } else { &mut train };
        serde_json::to_writer(&mut *w, &rec)?;
        w.write_all(b"\n")?;
    }
    train.flush()?;
    test.flush()?;
    Ok((train_path, test_path))
}

#[cfg(test)]
mod tests {
    use super::{chat_dates, civil_date};

    #[test]
    fn calendar_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(-7305), "1950-01-01");
        assert_eq!(civil_date(25566), "2039-12-31");
        assert_eq!(civil_date(19782), "2024-02-29");
        assert_eq!(civil_date(19783), "2024-03-01");
    }

    #[test]
    fn the_chat_task_draws_every_day_of_the_month() {
        let dates = chat_dates(3000, 7);
        let unique: std::collections::HashSet<&String> = dates.iter().collect();
        assert_eq!(unique.len(), dates.len());
        for day in ["29", "30", "31"] {
            assert!(dates.iter().any(|d| d.ends_with(day)), "no day {day}");
        }
        assert!(dates
            .iter()
            .all(|d| !d.ends_with("-02-30") && !d.ends_with("-04-31")));
    }
}
