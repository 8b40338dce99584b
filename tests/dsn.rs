//! Delivery status notifications: structure (RFC 3464 / RFC 6522), content, and what must never
//! be in them (the original body).

use chrono::{TimeZone, Utc};
use mail_parser::{MessageParser, MimeHeaders};
use sealpost::delivery::dsn::{self, Action, DsnError, Reported};
use sealpost::ids::MessageId;

const BODY_MARKER: &str = "PHI-MARKER-7f3a9c";

fn original() -> Vec<u8> {
    format!(
        "From: Clinic <app@clinic.example>\r\n\
         To: Patient <patient@example.org>\r\n\
         Subject: Lab results ready\r\n\
         Message-ID: <orig-1@clinic.example>\r\n\
         \r\n\
         Dear patient, your results: {BODY_MARKER}\r\n"
    )
    .into_bytes()
}

fn failed(address: &str) -> Reported {
    Reported {
        address: address.to_string(),
        action: Action::Failed,
        status: "5.1.1".to_string(),
        remote_mta: Some("mx1.example.org".to_string()),
        diagnostic: Some("550 5.1.1 no such user".to_string()),
    }
}

fn delayed(address: &str) -> Reported {
    Reported {
        address: address.to_string(),
        action: Action::Delayed,
        status: "4.4.1".to_string(),
        remote_mta: None,
        diagnostic: None,
    }
}

fn build(headers: &[u8], reported: &[Reported]) -> Result<Vec<u8>, DsnError> {
    let arrival = Utc.with_ymd_and_hms(2024, 3, 5, 14, 7, 9).single();
    let arrival = arrival.ok_or(DsnError::NoRecipients)?;
    dsn::build(
        "relay.sealpost.example",
        "app@clinic.example",
        &MessageId::from_string("018E0F2A3B4C5D6E7F000001"),
        arrival,
        headers,
        reported,
    )
}

/// Every line ends with CRLF and is at most 998 octets.
fn assert_wire_safe(raw: &[u8]) {
    assert!(raw.ends_with(b"\r\n"));
    for (i, line) in raw.split(|&b| b == b'\n').enumerate() {
        let is_last = i == raw.split(|&b| b == b'\n').count() - 1;
        if is_last {
            assert!(line.is_empty());
            continue;
        }
        assert!(
            line.ends_with(b"\r"),
            "line {i} not CRLF: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !line[..line.len() - 1].contains(&b'\r'),
            "bare CR in line {i}"
        );
        assert!(
            line.len() - 1 <= 998,
            "line {i} is {} octets",
            line.len() - 1
        );
    }
}

/// Contents of the three parts (as text), after checking the report's structure.
fn report_parts(raw: &[u8]) -> Vec<String> {
    let message = MessageParser::new().parse(raw).expect("parseable");
    let ct = message.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let root = message.root_part();
    let ids = root.sub_parts().expect("multipart").to_vec();
    assert_eq!(ids.len(), 3, "exactly three parts");
    let expected = [
        ("text", "plain"),
        ("message", "delivery-status"),
        ("text", "rfc822-headers"),
    ];
    ids.iter()
        .zip(expected)
        .map(|(&id, (ctype, subtype))| {
            let part = message.part(id).expect("part");
            let ct = part.content_type().expect("part content type");
            assert_eq!((ct.ctype(), ct.subtype()), (ctype, Some(subtype)));
            part.text_contents().expect("utf-8 part").to_string()
        })
        .collect()
}

/// Per-recipient blocks of a delivery-status body: (field name lowercased, unfolded value).
fn status_blocks(body: &str) -> Vec<Vec<(String, String)>> {
    let body = body.replace("\r\n", "\n");
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let unfolded = block.replace("\n ", " ").replace("\n\t", " ");
            unfolded
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
                .collect()
        })
        .collect()
}

fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn report_structure_and_headers() {
    let original = original();
    let raw = build(
        dsn::header_block(&original),
        &[failed("patient@example.org")],
    )
    .unwrap();
    assert_wire_safe(&raw);
    assert_eq!(report_parts(&raw).len(), 3);

    let message = MessageParser::new().parse(&raw).unwrap();
    let from = message.from().and_then(|a| a.first()).expect("From");
    assert_eq!(from.address(), Some("MAILER-DAEMON@relay.sealpost.example"));
    assert_eq!(from.name(), Some("Mail Delivery System"));
    let to = message.to().and_then(|a| a.first()).expect("To");
    assert_eq!(to.address(), Some("app@clinic.example"));
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(
        message.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    assert!(message.date().is_some());
    let id = message.message_id().expect("Message-ID");
    assert!(id.ends_with("@relay.sealpost.example"), "{id}");
    assert_eq!(
        message.header_raw("MIME-Version").map(str::trim),
        Some("1.0")
    );
}

#[test]
fn delivery_status_fields_per_recipient() {
    let original = original();
    let mut second = failed("nobody@other.example");
    second.status = "5.7.1".to_string();
    second.remote_mta = Some("mx.other.example".to_string());
    second.diagnostic = Some("554 5.7.1 relay denied".to_string());
    let reported = [
        failed("patient@example.org"),
        second,
        delayed("slow@late.example"),
    ];
    let raw = build(dsn::header_block(&original), &reported).unwrap();
    assert_wire_safe(&raw);
    let parts = report_parts(&raw);
    let blocks = status_blocks(&parts[1]);
    assert_eq!(blocks.len(), 4, "per-message block and three recipients");

    let per_message = &blocks[0];
    assert_eq!(
        field(per_message, "reporting-mta"),
        Some("dns; relay.sealpost.example")
    );
    assert_eq!(
        field(per_message, "x-sealpost-queue-id"),
        Some("018E0F2A3B4C5D6E7F000001")
    );
    let arrival = field(per_message, "arrival-date").expect("Arrival-Date");
    assert!(arrival.contains("5 Mar 2024 14:07:09"), "{arrival}");

    let expect = [
        (
            "patient@example.org",
            "failed",
            "5.1.1",
            Some("mx1.example.org"),
            Some("550 5.1.1 no such user"),
        ),
        (
            "nobody@other.example",
            "failed",
            "5.7.1",
            Some("mx.other.example"),
            Some("554 5.7.1 relay denied"),
        ),
        ("slow@late.example", "delayed", "4.4.1", None, None),
    ];
    for (block, (address, action, status, mta, diagnostic)) in blocks[1..].iter().zip(expect) {
        assert_eq!(
            field(block, "final-recipient"),
            Some(format!("rfc822; {address}").as_str())
        );
        assert_eq!(field(block, "action"), Some(action));
        assert_eq!(field(block, "status"), Some(status));
        assert_eq!(
            field(block, "remote-mta").map(str::to_string),
            mta.map(|m| format!("dns; {m}"))
        );
        assert_eq!(
            field(block, "diagnostic-code").map(str::to_string),
            diagnostic.map(|d| format!("smtp; {d}"))
        );
        assert!(field(block, "last-attempt-date").is_some());
    }

    // The human-readable part names every recipient and reason.
    for address in [
        "patient@example.org",
        "nobody@other.example",
        "slow@late.example",
    ] {
        assert!(parts[0].contains(address), "{}", parts[0]);
    }
    assert!(parts[0].contains("550 5.1.1 no such user"));
}

#[test]
fn headers_part_has_headers_but_never_the_body() {
    let original = original();
    let raw = build(
        dsn::header_block(&original),
        &[failed("patient@example.org")],
    )
    .unwrap();
    let parts = report_parts(&raw);
    assert!(
        parts[2].contains("Subject: Lab results ready"),
        "{}",
        parts[2]
    );
    assert!(parts[2].ends_with("\r\n"));
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains(BODY_MARKER));
    assert!(!text.contains("Dear patient"));

    // Even the whole message passed by mistake yields only its headers.
    let raw = build(&original, &[failed("patient@example.org")]).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains(BODY_MARKER));
    assert!(report_parts(&raw)[2].contains("Subject: Lab results ready"));

    // LF-only originals too.
    let lf = String::from_utf8(original.clone())
        .unwrap()
        .replace("\r\n", "\n");
    let raw = build(lf.as_bytes(), &[failed("patient@example.org")]).unwrap();
    assert_wire_safe(&raw);
    assert!(!String::from_utf8_lossy(&raw).contains(BODY_MARKER));
    assert!(report_parts(&raw)[2].contains("Subject: Lab results ready\r\n"));
}

#[test]
fn delayed_only_subject() {
    let raw = build(b"Subject: x\r\n", &[delayed("slow@late.example")]).unwrap();
    let message = MessageParser::new().parse(&raw).unwrap();
    assert_eq!(
        message.subject(),
        Some("Delayed Mail (still being retried)")
    );
    let blocks = status_blocks(&report_parts(&raw)[1]);
    assert_eq!(field(&blocks[1], "action"), Some("delayed"));
}

#[test]
fn header_block_cases() {
    assert_eq!(
        dsn::header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
        b"A: 1\r\nB: 2\r\n"
    );
    assert_eq!(dsn::header_block(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\nB: 2\n");
    assert_eq!(dsn::header_block(b"A: 1\r\nB: 2\r\n"), b"A: 1\r\nB: 2\r\n");
    assert_eq!(dsn::header_block(b"A: 1"), b"A: 1");
    assert_eq!(dsn::header_block(b"\r\nbody"), b"");
    assert_eq!(dsn::header_block(b""), b"");
    // The first empty line wins, whichever line ending it uses.
    assert_eq!(
        dsn::header_block(b"A: 1\r\n\nbody\r\n\r\nmore"),
        b"A: 1\r\n"
    );
}

#[test]
fn hostile_header_block_cannot_break_the_structure() {
    // Lines that look like delimiters of every plausible boundary, including ours.
    let hostile = b"Subject: hi\r\n\
        --=_sealpost-dsn-0-0\r\n\
        --=_sealpost-dsn\r\n\
        --\r\n\
        ----\r\n\
        X-Note: --=_sealpost-dsn-\r\n\
        Content-Type: text/plain\r\n";
    let raw = build(hostile, &[failed("patient@example.org")]).unwrap();
    assert_wire_safe(&raw);
    let parts = report_parts(&raw);
    // Lines that are not header fields end the header block: a would-be boundary line never
    // reaches the report (and body text never passes for headers).
    assert!(!parts[2].contains("--=_sealpost-dsn-0-0"));
    assert_eq!(parts[2], "Subject: hi\r\n");

    // A header block missing its final line ending and with bare CR/LF still ends in CRLF.
    let raw = build(
        b"Subject: hi\rX-A: 1\nX-B: 2",
        &[failed("patient@example.org")],
    )
    .unwrap();
    assert_wire_safe(&raw);
    assert_eq!(report_parts(&raw)[2], "Subject: hi\r\nX-A: 1\r\nX-B: 2\r\n");
}

#[test]
fn long_and_non_ascii_values_stay_within_limits() {
    let mut recipient = failed("pätient@exämple.org");
    let long_word = "x".repeat(1500);
    recipient.diagnostic = Some(format!(
        "550-5.1.1 first line\r\n550-5.1.1 {long_word}\r\n550 5.1.1 ünïcode \u{0} end {}",
        "word ".repeat(200)
    ));
    let long_header = format!("Subject: {}\r\nX-Ü: ö\r\n", "y".repeat(2000));
    let raw = build(long_header.as_bytes(), &[recipient]).unwrap();
    assert_wire_safe(&raw);
    let parts = report_parts(&raw);
    // Header part re-encoded (base64) and decoded back intact.
    assert!(parts[2].contains(&"y".repeat(2000)));
    assert!(parts[2].contains("X-Ü: ö"));
    let blocks = status_blocks(&parts[1]);
    let recipient = &blocks[1];
    assert_eq!(
        field(recipient, "final-recipient"),
        Some("utf-8; p\\x{E4}tient@ex\\x{E4}mple.org")
    );
    let diagnostic = field(recipient, "diagnostic-code").unwrap();
    assert!(
        diagnostic.starts_with("smtp; 550-5.1.1 first line 550-5.1.1 xxx"),
        "{diagnostic}"
    );
    assert!(diagnostic.contains("\\x{FC}n\\x{EF}code"), "{diagnostic}");
    assert!(diagnostic.is_ascii());
    assert!(
        diagnostic.ends_with(" ..."),
        "long replies are cut: {diagnostic}"
    );
    // A word too long for one line is split by folding whitespace, not lost.
    assert!(diagnostic.replace(' ', "").contains(&long_word));
    // The delivery-status part is 7-bit.
    assert!(parts[1].is_ascii());
    assert!(parts[0].contains("pätient@exämple.org"));
}

#[test]
fn invalid_inputs_are_typed_errors() {
    let ok = [failed("patient@example.org")];
    assert_eq!(build(b"", &[]), Err(DsnError::NoRecipients));
    let mut bad = failed("patient@example.org");
    bad.status = "5.1".to_string();
    assert_eq!(
        build(b"", &[bad]),
        Err(DsnError::InvalidStatus { index: 0 })
    );
    let mut bad = failed("patient@example.org");
    bad.status = "3.1.1".to_string();
    assert!(matches!(
        build(b"", &[ok[0].clone(), bad]),
        Err(DsnError::InvalidStatus { index: 1 })
    ));
    let mut bad = failed("patient@example.org\r\nBcc: x@y");
    assert!(matches!(
        build(b"", &[bad.clone()]),
        Err(DsnError::InvalidAddress { .. })
    ));
    bad = failed("patient@example.org");
    bad.remote_mta = Some("mx.example.org\r\nX: y".to_string());
    assert!(matches!(
        build(b"", &[bad]),
        Err(DsnError::InvalidHost { .. })
    ));

    let arrival = Utc::now();
    let id = MessageId::from_string("018E0F2A3B4C5D6E7F000001");
    assert_eq!(
        dsn::build("relay.example", "", &id, arrival, b"", &ok),
        Err(DsnError::NullSender)
    );
    assert!(matches!(
        dsn::build("relay example", "a@b", &id, arrival, b"", &ok),
        Err(DsnError::InvalidHost { .. })
    ));
    assert!(matches!(
        dsn::build("relay.example", "a@b\r\nX: 1", &id, arrival, b"", &ok),
        Err(DsnError::InvalidAddress { .. })
    ));
    assert_eq!(
        dsn::build(
            "relay.example",
            "a@b",
            &MessageId::from_string("a b"),
            arrival,
            b"",
            &ok
        ),
        Err(DsnError::InvalidQueueId)
    );
}

#[test]
fn empty_header_block_still_yields_three_parts() {
    let raw = build(b"", &[failed("patient@example.org")]).unwrap();
    assert_wire_safe(&raw);
    let message = MessageParser::new().parse(&raw).unwrap();
    let ids = message.root_part().sub_parts().unwrap();
    assert_eq!(ids.len(), 3);
}
