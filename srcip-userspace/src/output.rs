//! `--format`: how srcip writes what it reports, for a program or for a person.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One line of words per alert or row.
    Text,
}

/// `count` and the noun that goes with it, for a person: "1 rule", "2 rules".
pub fn counted(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::counted;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(counted(1, "rule", "rules"), "1 rule");
        assert_eq!(counted(0, "rule", "rules"), "0 rules");
        assert_eq!(counted(2, "destination", "destinations"), "2 destinations");
    }
}
