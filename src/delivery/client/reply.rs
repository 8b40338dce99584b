//! Replies as the rest of the crate sees them, and EHLO keywords as [`Capabilities`].

use smtp_proto::Response;

use super::Capabilities;
use crate::smtp::RemoteReply;

/// The owned reply: enhanced code (RFC 3463) when the server sent one, lines joined by spaces.
pub(super) fn remote(response: &Response<String>) -> RemoteReply {
    let [class, subject, detail] = response.esc;
    let enhanced = matches!(class, 2 | 4 | 5).then(|| format!("{class}.{subject}.{detail}"));
    let text = response
        .message
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    RemoteReply {
        code: response.code,
        enhanced,
        text,
    }
}

/// The extensions of a `250` EHLO reply (RFC 5321 §4.1.1.1): the first line is the server's
/// name, each further line one keyword with its parameters.
pub(super) fn capabilities(response: &Response<String>) -> Capabilities {
    let mut caps = Capabilities {
        esmtp: true,
        ..Capabilities::default()
    };
    for line in response.message.split('\n').skip(1) {
        let mut words = line.split_ascii_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword.to_ascii_uppercase().as_str() {
            "PIPELINING" => caps.pipelining = true,
            "STARTTLS" => caps.starttls = true,
            "8BITMIME" => caps.eightbitmime = true,
            "SMTPUTF8" => caps.smtputf8 = true,
            // RFC 1870: no number or 0 means no fixed limit.
            "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use smtp_proto::response::parser::ResponseReceiver;

    use super::*;

    fn parse(text: &str) -> Response<String> {
        let mut bytes = text.as_bytes().iter();
        ResponseReceiver::default().parse(&mut bytes).unwrap()
    }

    #[test]
    fn enhanced_code_and_joined_text() {
        let r = remote(&parse(
            "550-5.1.1 The email account that you tried to reach\r\n550 5.1.1 does not exist\r\n",
        ));
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(
            r.text,
            "The email account that you tried to reach does not exist"
        );
    }

    #[test]
    fn no_enhanced_code() {
        let r = remote(&parse("220 mx.example.com ESMTP ready\r\n"));
        assert_eq!(r.code, 220);
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "mx.example.com ESMTP ready");
        let r = remote(&parse("354\r\n"));
        assert_eq!((r.code, r.text.as_str()), (354, ""));
    }

    #[test]
    fn ehlo_keywords() {
        let caps = capabilities(&parse(
            "250-mx.example.com hello\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n\
             250-8BITMIME\r\n250-starttls\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n",
        ));
        assert_eq!(
            caps,
            Capabilities {
                esmtp: true,
                pipelining: true,
                starttls: true,
                size: Some(35882577),
                eightbitmime: true,
                smtputf8: true,
            }
        );
        let caps = capabilities(&parse("250-mx\r\n250 SIZE\r\n"));
        assert_eq!(caps.size, Some(0));
        assert!(!caps.starttls);
    }
}
