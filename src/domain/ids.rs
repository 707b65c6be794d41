//! Identifier patterns from the upstream model (`farm-[0-9a-f]{32}` and friends).

/// The hex digits every Deadline identifier carries.
const ID_HEX_LEN: usize = 32;

/// `farm-[0-9a-f]{32}`
pub fn is_farm_id(s: &str) -> bool {
    is_prefixed_hex(s, "farm-")
}

/// `queue-[0-9a-f]{32}`
pub fn is_queue_id(s: &str) -> bool {
    is_prefixed_hex(s, "queue-")
}

/// `fleet-[0-9a-f]{32}`
pub fn is_fleet_id(s: &str) -> bool {
    is_prefixed_hex(s, "fleet-")
}

/// `job-[0-9a-f]{32}`
pub fn is_job_id(s: &str) -> bool {
    is_prefixed_hex(s, "job-")
}

/// `[0-9a-f]{32}`: an upstream aggregation id.
pub fn is_aggregation_id(s: &str) -> bool {
    is_prefixed_hex(s, "")
}

/// The account and role path (`path/NAME`) of an IAM role's ARN, `arn:aws[-partition]:iam::ACCOUNT:role/NAME`.
pub fn role_arn_parts(arn: &str) -> Option<(&str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (arn_, partition, service, region, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let role = resource.strip_prefix("role/")?;
    let ok = arn_ == "arn"
        && partition.starts_with("aws")
        && service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && !role.is_empty()
        && role.len() <= 512
        && role.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@-_/".contains(c));
    ok.then_some((account, role))
}

fn is_prefixed_hex(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == ID_HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Formats `prefix` followed by 32 lowercase hex digits taken from two 64-bit words.
pub fn format_id(prefix: &str, hi: u64, lo: u64) -> String {
    format!("{prefix}{hi:016x}{lo:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_the_model() {
        assert!(is_farm_id("farm-0123456789abcdef0123456789abcdef"));
        assert!(!is_farm_id("farm-0123456789ABCDEF0123456789abcdef"));
        assert!(!is_farm_id("farm-0123456789abcdef0123456789abcde"));
        assert!(!is_farm_id("queue-0123456789abcdef0123456789abcdef"));
        assert!(is_queue_id(&format_id("queue-", 1, 2)));
        assert!(is_fleet_id(&format_id("fleet-", u64::MAX, 0)));
        assert!(is_job_id(&format_id("job-", 7, 7)));
        assert!(is_aggregation_id(&format_id("", 3, 4)));
        assert!(!is_aggregation_id("g123456789abcdef0123456789abcdef"));
    }
}
