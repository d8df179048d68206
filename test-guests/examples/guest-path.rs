//! Prints the path of the built test guest (used by scripts/quickstart.sh).
fn main() {
    println!("{}", test_guests::guest_path().display());
}
