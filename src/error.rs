//! The one error type: a CNI error code plus a message that gains context at each layer.

use std::fmt;

/// CNI spec error codes this plugin returns.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The plugin's own failures start at 100.
    pub const FIREWALL: u32 = 100;
    pub const PORT_CONFLICT: u32 = 101;
    pub const CHECK_FAILED: u32 = 102;
    pub const ROUTING: u32 = 103;
    pub const INTERNAL: u32 = 199;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Error { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Error::new(code::INVALID_CONFIG, msg)
    }

    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        Error::new(code::IO, format!("{what}: {err}"))
    }

    /// Prefix the message with what the caller was doing.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

pub trait Context<T> {
    fn context(self, ctx: impl fmt::Display) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(ctx))
    }
}
