fn main() {
    // PLACEHOLDER
}
