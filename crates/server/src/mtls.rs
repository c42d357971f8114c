//! Client certificates (`--tls-client-ca`): the names a verified client certificate carries,
//! for the roles a tokens file gives them (`cert:NAME ROLE [LABEL]` lines).
//!
//! rustls has already verified the chain against the configured CA when a request gets here;
//! this only reads the leaf certificate's subject common names and its subjectAltName DNS
//! names and e-mail addresses. A small DER reader (bounds-checked, never panicking: a
//! certificate it cannot read has no names) instead of a full X.509 parser dependency.

/// DER tags used here.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// `[0] EXPLICIT` version, `[3] EXPLICIT` extensions of a TBSCertificate.
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
/// GeneralName `[1] rfc822Name` and `[2] dNSName` (IMPLICIT IA5String).
const SAN_EMAIL: u8 = 0x81;
const SAN_DNS: u8 = 0x82;

/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element: its tag, its content, and what follows it. `None` when the input is not
/// one (a multi-byte tag, an indefinite or oversized length, content past the end).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    let (content, after) = rest.split_at_checked(len)?;
    Some((tag, content, after))
}

/// The elements of a constructed element's content, in order.
fn elements(mut content: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, inner, rest) = element(content)?;
        content = rest;
        Some((tag, inner))
    })
}

/// The element of `content` with tag `want`, after skipping ones before it.
fn expect(content: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, inner, rest) = element(content)?;
    (tag == want).then_some((inner, rest))
}

/// The names of a DER certificate: its subject's common names, then its subjectAltName DNS
/// names and e-mail addresses. Empty when it cannot be read.
pub(crate) fn certificate_names(der: &[u8]) -> Vec<String> {
    names(der).unwrap_or_default()
}

fn names(der: &[u8]) -> Option<Vec<String>> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if let Some((VERSION, _, after)) = element(rest) {
        rest = after;
    }
    // serialNumber, signature, issuer, validity: skipped.
    for _ in 0..4 {
        rest = element(rest)?.2;
    }
    let (subject, after) = expect(rest, SEQUENCE)?;
    // subjectPublicKeyInfo, then the optional unique ids and extensions.
    let (_, _, mut rest) = element(after)?;
    let mut out = Vec::new();
    for (tag, rdn) in elements(subject) {
        if tag != SET {
            continue;
        }
        for (_, attribute) in elements(rdn).filter(|(t, _)| *t == SEQUENCE) {
            let (oid, value) = expect(attribute, OID)?;
            if oid == COMMON_NAME
                && let Some((_, text, _)) = element(value)
                && let Ok(s) = std::str::from_utf8(text)
            {
                out.push(s.to_owned());
            }
        }
    }
    while let Some((tag, inner, after)) = element(rest) {
        rest = after;
        if tag != EXTENSIONS {
            continue;
        }
        let (extensions, _) = expect(inner, SEQUENCE)?;
        for (_, ext) in elements(extensions).filter(|(t, _)| *t == SEQUENCE) {
            let (oid, mut value) = expect(ext, OID)?;
            if oid != SUBJECT_ALT_NAME {
                continue;
            }
            if let Some((BOOLEAN, _, after)) = element(value) {
                value = after;
            }
            let (octets, _) = expect(value, OCTET_STRING)?;
            let (general_names, _) = expect(octets, SEQUENCE)?;
            for (tag, name) in elements(general_names) {
                if matches!(tag, SAN_DNS | SAN_EMAIL)
                    && let Ok(s) = std::str::from_utf8(name)
                {
                    out.push(s.to_owned());
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_common_name_and_the_alternative_names() {
        let mut params = rcgen::CertificateParams::new(vec!["ci.example.com".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ci-runner");
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "ci@example.com".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_names(cert.der()),
            vec!["ci-runner", "ci.example.com", "ci@example.com"]
        );
    }

    #[test]
    fn anything_else_has_no_names_and_never_panics() {
        assert!(certificate_names(b"").is_empty());
        assert!(certificate_names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(certificate_names(&[0x30, 0x03, 0x30, 0x01]).is_empty());
        // Every truncation of a real certificate.
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        for n in 0..der.len() {
            let _ = certificate_names(&der[..n]);
        }
    }
}
