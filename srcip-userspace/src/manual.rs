//! The man pages: clap's pages of the commands and flags, and in `srcip.1` the reference's
//! sections an operator looks up in `man` (the policy format, the alerts, exit status,
//! privileges, files, examples), turned from `docs/reference.md` into roff when the pages
//! are written. One source for both: the pages cannot drift from the reference.

use std::{io::Write as _, path::Path};

/// The user reference, as the project ships it.
const REFERENCE: &str = include_str!("../../docs/reference.md");

/// The reference's sections that `srcip.1` carries, by heading, with their man section name.
const SECTIONS: [(&str, &str); 6] = [
    ("Policy file (TOML)", "POLICY FILE"),
    ("Alert stream", "ALERTS"),
    ("Exit codes", "EXIT STATUS"),
    ("Privileges", "PRIVILEGES"),
    ("Files", "FILES"),
    ("Examples", "EXAMPLES"),
];

/// Writes `srcip.1` and a page per subcommand into `dir`.
pub fn write_man_pages(dir: &Path, command: clap::Command) -> std::io::Result<()> {
    clap_mangen::generate_to(command, dir)?;
    let mut page = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("srcip.1"))?;
    for (heading, name) in SECTIONS {
        let markdown = section(REFERENCE, heading).unwrap_or_else(|| {
            panic!("docs/reference.md has no section \"## {heading}\", which srcip.1 carries")
        });
        page.write_all(format!(".SH \"{name}\"\n{}", roff(markdown)).as_bytes())?;
    }
    Ok(())
}

/// The text under `## heading`, up to the next `## `.
fn section<'a>(markdown: &'a str, heading: &str) -> Option<&'a str> {
    let start = markdown.find(&format!("\n## {heading}\n"))? + heading.len() + 5;
    let rest = &markdown[start..];
    Some(rest.find("\n## ").map_or(rest, |end| &rest[..end]))
}

/// Markdown, as the reference writes it, in roff: `###` subsections, paragraphs, bullet and
/// numbered lists, code blocks and tables (one tagged paragraph per row).
fn roff(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    let mut header_row = true;
    for line in markdown.lines() {
        if line.starts_with("```") {
            out.push_str(if in_code {
                ".fi\n.RE\n"
            } else {
                ".RS 4\n.nf\n"
            });
            in_code = !in_code;
            continue;
        }
        if in_code {
            out.push_str(&escape(line));
            out.push('\n');
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            out.push_str(".PP\n");
            header_row = true;
        } else if let Some(title) = trimmed.strip_prefix("### ") {
            out.push_str(&format!(".SS \"{}\"\n", inline(title)));
        } else if trimmed.starts_with('|') {
            let cells: Vec<&str> = trimmed
                .trim_matches('|')
                .split(" | ")
                .map(str::trim)
                .collect();
            if cells.iter().all(|cell| cell.chars().all(|c| c == '-')) {
                continue;
            }
            // The first row names the columns.
            if std::mem::replace(&mut header_row, false) {
                continue;
            }
            out.push_str(&format!(
                ".TP\n\\fB{}\\fR\n{}\n",
                inline(cells[0]),
                inline(&cells[1..].join(" \\(em "))
            ));
        } else if let Some(item) = trimmed.strip_prefix("- ") {
            out.push_str(&format!(".IP \\(bu 2\n{}\n", inline(item)));
        } else if let Some((number, item)) = trimmed
            .split_once(". ")
            .filter(|(number, _)| number.chars().all(|c| c.is_ascii_digit()))
        {
            out.push_str(&format!(".IP {number}. 4\n{}\n", inline(item)));
        } else {
            out.push_str(&inline(trimmed));
            out.push('\n');
        }
    }
    out
}

/// One line of text: code spans and `**strong**` bold, Markdown's escapes of `|` undone,
/// and roff's special characters escaped.
fn inline(text: &str) -> String {
    let text = escape(&text.replace("\\|", "|"));
    bold_between(&bold_between(&text, "**"), "`")
}

/// `text` with every other piece between `marker`s in bold.
fn bold_between(text: &str, marker: &str) -> String {
    let mut out = String::new();
    for (index, part) in text.split(marker).enumerate() {
        if index % 2 == 1 {
            out.push_str(&format!("\\fB{part}\\fR"));
        } else {
            out.push_str(part);
        }
    }
    out
}

/// Backslashes, and a leading `.` or `'`, which roff would read as a request.
fn escape(line: &str) -> String {
    let line = line.replace('\\', "\\e");
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_srcip_1_carries_is_in_the_reference() {
        for (heading, _) in SECTIONS {
            let text = section(REFERENCE, heading).unwrap_or_else(|| panic!("{heading}"));
            assert!(!text.trim().is_empty(), "{heading}");
        }
    }

    #[test]
    fn markdown_becomes_roff() {
        let text = roff(
            "A `code` **word**.\n\n| code | meaning |\n| --- | --- |\n| 0 | success \\| ok |\n\n- one\n1. first\n```sh\n.hidden\n```\n",
        );
        assert_eq!(
            text,
            "A \\fBcode\\fR \\fBword\\fR.\n.PP\n.TP\n\\fB0\\fR\nsuccess | ok\n.PP\n.IP \\(bu 2\none\n.IP 1. 4\nfirst\n.RS 4\n.nf\n\\&.hidden\n.fi\n.RE\n"
        );
    }
}
