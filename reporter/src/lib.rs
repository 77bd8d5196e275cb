//! iac-reporter (under construction).
