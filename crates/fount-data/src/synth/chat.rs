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

/// The years the task's dates are drawn from.
const CHAT_YEARS: std::ops::Range<u32> = 1950..2040;

/// Days in `month` of `year` (Gregorian).
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// Every calendar day of [`CHAT_YEARS`] as `YYYY-MM-DD`, in order.
fn calendar() -> Vec<String> {
    let mut days = Vec::new();
    for year in CHAT_YEARS {
        for month in 1..=12 {
            for day in 1..=days_in_month(year, month) {
                days.push(format!("{year:04}-{month:02}-{day:02}"));
            }
        }
    }
    days
}

/// `n` distinct dates drawn uniformly from every calendar day of 1950–2039 (days 29, 30 and 31
/// where the month has them, 29 February in leap years), in draw order.
fn chat_dates(n: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0c4a_7000);
    let calendar = calendar();
    let n = n.min(calendar.len());
    let mut seen = std::collections::HashSet::new();
    let mut dates = Vec::with_capacity(n);
    while dates.len() < n {
        let day = rng.random_range(0..calendar.len());
        if seen.insert(day) {
            dates.push(calendar[day].clone());
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
    use super::{calendar, chat_dates};

    #[test]
    fn the_calendar_has_every_day() {
        let days = calendar();
        // 90 years, 22 of them leap years (1952 … 2036; 2000 is one)
        assert_eq!(days.len(), 90 * 365 + 22);
        assert_eq!(days.first().map(String::as_str), Some("1950-01-01"));
        assert_eq!(days.last().map(String::as_str), Some("2039-12-31"));
        assert!(days.iter().any(|d| d == "2000-02-29"));
        assert!(!days.iter().any(|d| d == "1900-02-29" || d == "2023-02-29"));
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
