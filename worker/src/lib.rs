//! iac-worker (under construction).
