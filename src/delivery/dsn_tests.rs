//! Unit tests of the DSN builder (integration tests: tests/dsn.rs).

use super::*;

fn part(body: &[u8]) -> Part {
    Part::new("text/plain", encode_text(body.to_vec()), "test")
}

#[test]
fn boundary_skips_candidates_found_in_content() {
    let parts = [part(b"--=_b-0\r\n"), part(b"X: =_b-1\r\n")];
    assert_eq!(boundary_from("=_b", &parts), Ok("=_b-2".to_string()));
    let all: Vec<u8> = (0..BOUNDARY_ATTEMPTS)
        .flat_map(|n| format!("=_b-{n}\r\n").into_bytes())
        .collect();
    assert_eq!(
        boundary_from("=_b", &[part(&all)]),
        Err(DsnError::NoBoundary)
    );
}

#[test]
fn seven_bit_detection() {
    assert!(is_7bit(b"a\r\nb\r\n"));
    assert!(!is_7bit(b"a\nb"));
    assert!(!is_7bit(b"a\rb"));
    assert!(!is_7bit(b"a\0b"));
    assert!(!is_7bit("\u{e9}".as_bytes()));
    assert!(is_7bit(&[b'a'; MAX_LINE]));
    assert!(!is_7bit(&[b'a'; MAX_LINE + 1]));
}
