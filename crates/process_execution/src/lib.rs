//! What a build engine asks to run (`Process`), the `CommandRunner` trait, and the local sandboxed runner.
