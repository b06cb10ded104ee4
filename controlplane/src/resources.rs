//! LAIN resources: a resource app's lain.yaml is a template whose placeholders are filled from
//! a client's `use_resources` parameters, then run as the app `resource.{res}.{client}`.

use minijinja::{Environment, UndefinedBehavior};

/// Why a resource template could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("{file}: cannot render resource template: {message}")]
pub struct RenderError {
    /// The template's file name.
    pub file: String,
    /// What went wrong, with the template line where minijinja knows it.
    pub message: String,
}

/// Renders a resource's lain.yaml template with the client's parameters. Undefined
/// placeholders are errors, so a client that forgets a parameter is told which one.
pub fn render(
    file: &str,
    template: &str,
    params: &serde_json::Value,
) -> Result<String, RenderError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let fail = |e: minijinja::Error| RenderError {
        file: file.to_string(),
        message: match e.line() {
            Some(l) => format!("line {l}: {e}"),
            None => e.to_string(),
        },
    };
    env.add_template("lain.yaml", template).map_err(fail)?;
    let tmpl = env.get_template("lain.yaml").map_err(fail)?;
    tmpl.render(params).map_err(fail)
}

/// Whether a lain.yaml declares a resource (a top-level `apptype: resource` line); such a
/// file is a template and is only parsed once rendered for a client.
pub fn is_template(text: &str) -> bool {
    top_level(text, "apptype").as_deref() == Some("resource")
}

/// The value of a top-level `key: value` line, unquoted.
pub fn top_level(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let v = rest.split('#').next().unwrap_or("").trim();
        Some(v.trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

/// Renames a rendered resource to its instance name, as lain-sdk did, by rewriting its
/// top-level `appname:` line; the other lines keep their numbers for error locations.
pub fn rename(text: &str, instance: &str) -> String {
    let mut done = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|l| {
            if !done && l.starts_with("appname:") {
                done = true;
                format!("appname: {instance}")
            } else {
                l.to_string()
            }
        })
        .collect();
    if text.ends_with('\n') {
        out.push(String::new());
    }
    out.join("\n")
}

/// Checks that a template compiles, so a syntax error is reported when the resource is
/// registered rather than when a client first uses it.
pub fn check(file: &str, template: &str) -> Result<(), RenderError> {
    let mut env = Environment::new();
    env.add_template("lain.yaml", template)
        .map(|_| ())
        .map_err(|e| RenderError {
            file: file.to_string(),
            message: match e.line() {
                Some(l) => format!("line {l}: {e}"),
                None => e.to_string(),
            },
        })
}

/// The app name of resource `res` instantiated for `client`.
pub fn instance_name(res: &str, client: &str) -> String {
    format!("resource.{res}.{client}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_parameters_are_errors() {
        let e = render("r.yaml", "a: {{ nope }}\n", &serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("r.yaml"), "{e}");
        assert_eq!(
            render("r.yaml", "a: {{ x }}", &serde_json::json!({"x": 1})).unwrap(),
            "a: 1"
        );
        assert_eq!(instance_name("redis", "hello"), "resource.redis.hello");
        let t =
            "appname: redis\napptype: resource # a template\nservice.redis:\n  cmd: x {{ m }}\n";
        assert!(is_template(t));
        assert!(!is_template("appname: a\nweb:\n  apptype: resource\n"));
        assert_eq!(top_level(t, "appname").as_deref(), Some("redis"));
        assert!(check("r.yaml", t).is_ok());
        let r = rename(t, "resource.redis.hello");
        assert!(
            r.starts_with("appname: resource.redis.hello\napptype: resource"),
            "{r}"
        );
        assert!(r.ends_with('\n'));
        let e = check("r.yaml", "a: 1\nb: {{ x \n").unwrap_err();
        assert!(e.message.contains("line"), "{e}");
    }
}
