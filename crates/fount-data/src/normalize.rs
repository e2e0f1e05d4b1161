//! Unicode NFC normalisation and clean-up of control characters and whitespace.
//!
//! What changes: text is put in NFC; `\r\n` and `\r` become `\n`; control characters other than
//! `\n` and `\t`, zero-width characters and byte-order marks are removed; other Unicode spaces
//! (no-break, en/em, ideographic…) become a plain space; trailing spaces on each line are removed;
//! three or more consecutive newlines become two; the text is trimmed.

use std::borrow::Cow;

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

fn is_removed(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(
            c,
            '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' | '\u{feff}' | '\u{ad}'
        )
}

fn is_odd_space(c: char) -> bool {
    c != ' ' && c != '\n' && c != '\t' && c.is_whitespace() && !c.is_control()
}

/// Cleans `text` (see the module docs); borrows when nothing changes.
pub fn clean(text: &str) -> Cow<'_, str> {
    let nfc: Cow<str> = match is_nfc_quick(text.chars()) {
        IsNormalized::Yes => Cow::Borrowed(text),
        _ => Cow::Owned(text.nfc().collect()),
    };
    let needs_work = nfc.contains(['\r'])
        || nfc.contains("\n\n\n")
        || nfc.contains(" \n")
        || nfc.contains("\t\n")
        || nfc.starts_with(char::is_whitespace)
        || nfc.ends_with(char::is_whitespace)
        || (!nfc.is_ascii() && nfc.chars().any(|c| is_removed(c) || is_odd_space(c)))
        || (nfc.is_ascii()
            && nfc
                .bytes()
                .any(|b| b.is_ascii_control() && b != b'\n' && b != b'\t'));
    if !needs_work {
        return nfc;
    }
    let mut out = String::with_capacity(nfc.len());
    let mut chars = nfc.chars().peekable();
    while let Some(c) = chars.next() {
        let c = match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                '\n'
            }
            c if is_removed(c) => continue,
            c if is_odd_space(c) => ' ',
            c => c,
        };
        if c == '\n' {
            // trailing spaces of the line
            while out.ends_with([' ', '\t']) {
                out.pop();
            }
            if out.ends_with("\n\n") {
                continue;
            }
        }
        out.push(c);
    }
    Cow::Owned(out.trim().to_string())
}
