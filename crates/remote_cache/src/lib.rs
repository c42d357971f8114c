//! `remote_cache::CommandRunner`: wraps any `CommandRunner` with a REAPI ActionCache lookup and write-behind.
