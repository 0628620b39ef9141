//! usnetd client library. PLACEHOLDER.
