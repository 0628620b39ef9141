//! First-fragment decisions for later fragments (bounded, expiring). PLACEHOLDER.
