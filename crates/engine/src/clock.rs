//! The wall clock, in the one unit the record uses: Unix milliseconds. The driver takes
//! its clock as a value ([`crate::driver::Clock`]) so the tests can move time.

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` (Unix milliseconds) as an RFC 3339 time, e.g. `2026-12-02T10:00:00.000Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}
