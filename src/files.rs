//! The TOML files operators write (service credentials, the entitlement policy): read
//! and parsed in one place, with one error for a file that cannot be read or does not
//! parse. What a file's contents mean is its feature's business.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A file that cannot be read, or is not valid TOML for what it should hold.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: toml::de::Error,
    },
}

/// Reads and parses a TOML file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| FileError::Syntax {
        path: path.to_owned(),
        source,
    })
}
