//! The blob store: a local small-blob database and large-file pool, with an optional remote provider behind it.
