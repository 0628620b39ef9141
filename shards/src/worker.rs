//! Workers: receive a batch, classify, look up, group per endpoint, deliver. PLACEHOLDER.
