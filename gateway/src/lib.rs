//! iac-gateway (under construction).
