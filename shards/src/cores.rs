//! Parsing of operator-given core lists in taskset syntax (`2-5,8`). PLACEHOLDER.
