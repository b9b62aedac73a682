//! `--format`: how srcip writes what it reports, for a program or for a person.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One line of words per alert or row.
    Text,
}
