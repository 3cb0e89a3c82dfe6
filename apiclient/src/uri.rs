//! Request URIs: joining a path with a percent-encoded query string. Owns the encoding
//! rules; setting keys carry dots and double quotes (`settings.kernel.sysctl."vm.x"`), so
//! every query name and value goes through here rather than `format!`.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything except RFC 3986 "unreserved" characters is encoded; dots stay readable.
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one query name or value.
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, QUERY_COMPONENT).to_string()
}

/// `path` followed by `?name=value&…` with every name and value encoded; just `path` when
/// `params` is empty.
///
/// ```
/// assert_eq!(
///     apiclient::uri::with_query("/", &[("prefix", "settings.kernel.sysctl.\"vm.x\"")]),
///     "/?prefix=settings.kernel.sysctl.%22vm.x%22"
/// );
/// ```
pub fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let mut uri = path.to_owned();
    for (i, (name, value)) in params.iter().enumerate() {
        uri.push(if i == 0 { '?' } else { '&' });
        uri.push_str(&encode_component(name));
        uri.push('=');
        uri.push_str(&encode_component(value));
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_params_is_just_the_path() {
        assert_eq!(with_query("/settings", &[]), "/settings");
    }

    #[test]
    fn plain_values_stay_readable() {
        assert_eq!(
            with_query(
                "/settings/keypair",
                &[("tx", "apiclient-set-abcDEF0123456789")]
            ),
            "/settings/keypair?tx=apiclient-set-abcDEF0123456789"
        );
        assert_eq!(
            with_query("/", &[("prefix", "settings.host-containers.admin")]),
            "/?prefix=settings.host-containers.admin"
        );
    }

    #[test]
    fn quotes_and_reserved_characters_are_encoded() {
        assert_eq!(
            with_query(
                "/",
                &[("prefix", "settings.kernel.sysctl.\"vm.max_map_count\"")]
            ),
            "/?prefix=settings.kernel.sysctl.%22vm.max_map_count%22"
        );
        assert_eq!(
            with_query("/x", &[("keys", "a b,c&d=e/f?#%+")]),
            "/x?keys=a%20b%2Cc%26d%3De%2Ff%3F%23%25%2B"
        );
    }

    #[test]
    fn several_params_are_joined_with_ampersands() {
        assert_eq!(
            with_query("/p", &[("a", "1"), ("b c", "é")]),
            "/p?a=1&b%20c=%C3%A9"
        );
    }
}
