//! What a person does in the browser, one step per function, so the tests read like the story
//! they prove: log in at the exchange, register a passkey at the gate, ask for `withdraw` on a
//! key, confirm on the gate's page. Also the page checks every screenshot comes with.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::harness::{png_size, Browser};
use crate::site::{summary_for, Site};

/// Logs `name` in at the demo exchange's login page (through the gate, as pass-through), adds
/// a virtual authenticator to the tab and returns its id.
pub async fn log_in_with_authenticator(browser: &Browser, site: &Site, name: &str) -> String {
    log_in(browser, site, name).await;
    browser.add_virtual_authenticator().await
}

/// Logs `name` in at the demo exchange's login page.
pub async fn log_in(browser: &Browser, site: &Site, name: &str) {
    browser.goto(&format!("{}/", site.gate)).await;
    browser.fill("#name", name).await;
    browser
        .click("form[action='/login'] button[type=submit]")
        .await;
    browser.find("#key-rows tr").await;
}

/// Registers a passkey named `name` on the passkeys page, as a person would.
pub async fn register_passkey(browser: &Browser, site: &Site, name: &str) {
    browser
        .goto(&format!("{}/_stepgate/passkeys", site.gate))
        .await;
    browser.fill("#passkey-name", name).await;
    browser.click("#register-form button[type=submit]").await;
    // The page says so, then reloads with the passkey in its list.
    browser
        .wait_for_text("table.passkeys", &format!("the passkey {name:?}"), |text| {
            text.contains(name)
        })
        .await;
}

/// Ticks `withdraw` on the exchange page's key `key_id` and presses Save; the gate holds it.
/// Returns the change id from the "Confirm with your passkey" link the page then shows.
pub async fn ask_for_withdrawals(browser: &Browser, site: &Site, key_id: &str) -> String {
    browser.goto(&format!("{}/", site.gate)).await;
    let row = format!("#key-rows tr[data-key-id='{key_id}']");
    browser
        .click(&format!("{row} input[type=checkbox][value=withdraw]"))
        .await;
    browser.click(&format!("{row} button.save")).await;
    browser
        .wait_for_text("#step-up-summary", "the held change", |text| {
            text == summary_for(key_id)
        })
        .await;
    let link = browser
        .find("#step-up-link")
        .await
        .attr("href")
        .await
        .expect("read the confirm link")
        .expect("the held change links to the gate's confirm page");
    let change_id = link.rsplit('/').next().unwrap_or_default().to_string();
    assert_eq!(
        link,
        format!("{}/_stepgate/changes/{change_id}", site.gate),
        "the confirm link points at the gate's page for the change"
    );
    change_id
}

/// The same request the exchange page sends, from the page's own script: for tests that need
/// a held change but are not about the exchange page.
pub async fn hold_from_page_script(browser: &Browser, key_id: &str) -> String {
    let answer = browser
        .client
        .execute_async(
            "const [keyId, done] = arguments;
             fetch('/api/v1/api-keys/' + encodeURIComponent(keyId), {
               method: 'PUT',
               headers: {'Content-Type': 'application/json'},
               body: JSON.stringify({permissions: ['read', 'withdraw']}),
               credentials: 'same-origin',
             }).then(r => r.json().then(body => done({status: r.status, body})))
               .catch(e => done({error: String(e)}));",
            vec![json!(key_id)],
        )
        .await
        .expect("run the page script");
    assert_eq!(answer["status"], 403, "the gate holds it: {answer}");
    assert_eq!(answer["body"]["error"], "step_up_required", "{answer}");
    answer["body"]["change_id"]
        .as_str()
        .unwrap_or_else(|| panic!("step_up_required without a change id: {answer}"))
        .to_string()
}

/// Opens the change's confirm page.
pub async fn open_confirm_page(browser: &Browser, site: &Site, change_id: &str) {
    browser
        .goto(&format!("{}/_stepgate/changes/{change_id}", site.gate))
        .await;
    browser.find("#change").await;
}

/// Presses "Confirm with my passkey" and waits for the page to say it is confirmed.
pub async fn confirm_on_page(browser: &Browser, site: &Site, change_id: &str) {
    open_confirm_page(browser, site, change_id).await;
    browser.click("#confirm-button").await;
    browser
        .wait_for_text("#result", "the confirmation", |text| {
            text.starts_with("Confirmed.")
        })
        .await;
}

/// Waits until the confirm page (after its reload) shows the change cooling off, with a
/// running countdown; returns the countdown's text.
pub async fn wait_for_countdown(browser: &Browser) -> String {
    browser
        .wait_for_text("#state-words", "the cooling-off state", |text| {
            text.to_lowercase().contains("cooling")
        })
        .await;
    browser
        .wait_for_text("#countdown", "a running countdown", is_countdown)
        .await
}

/// `(in 23h 59m 58s)`: what the pages' script writes into `[data-until]`.
pub fn is_countdown(text: &str) -> bool {
    let Some(inner) = text
        .strip_prefix("(in ")
        .and_then(|rest| rest.strip_suffix(')'))
    else {
        return false;
    };
    !inner.is_empty()
        && inner.split(' ').all(|part| {
            let digits = part.trim_end_matches(['h', 'm', 's']);
            !digits.is_empty()
                && digits.len() < part.len()
                && digits.bytes().all(|b| b.is_ascii_digit())
        })
}

/// A sentence a person can read: not empty, no JSON, no stack trace, no error code.
pub fn assert_human_sentence(text: &str, context: &str) {
    let text = text.trim();
    assert!(
        text.len() > 20 && text.ends_with('.'),
        "{context}: expected a sentence, got {text:?}"
    );
    for raw in [
        "{",
        "}",
        "\"error\"",
        "Error:",
        "at http",
        "undefined",
        "null",
        "_",
    ] {
        assert!(
            !text.contains(raw),
            "{context}: the message shows raw text `{raw}`: {text:?}"
        );
    }
}

/// The two widths every page must work at.
pub const WIDTHS: [(&str, u32, bool); 2] = [("phone", 390, true), ("desktop", 1280, false)];

/// Checks the current page at a phone's and a desktop's width and takes its screenshots:
/// nothing wider than the screen, every resource from the gate itself (no CDN), no console
/// errors (a CSP violation is one). With `STEPGATE_WRITE_SCREENSHOTS=1` the PNGs are written
/// to `docs/screenshots/{name}-{phone,desktop}.png`; otherwise they are only checked, so a
/// test run never dirties the work tree.
pub async fn check_and_capture(browser: &Browser, site: &Site, name: &str) {
    let page = browser.url().await;
    for (label, width, mobile) in WIDTHS {
        browser.emulate_width(width, mobile).await;
        let layout = browser
            .script(
                "const width = arguments[0];
                 const doc = document.documentElement;
                 const wide = Array.from(document.querySelectorAll('body *'))
                   .filter(e => e.getBoundingClientRect().right > width + 1)
                   .slice(0, 8)
                   .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                          + (e.className ? '.' + String(e.className).replace(/ /g, '.') : '')
                          + ' right=' + Math.round(e.getBoundingClientRect().right));
                 return {inner: window.innerWidth, scroll: doc.scrollWidth, wide};",
                vec![json!(width)],
            )
            .await;
        // On a phone a too-wide element widens the layout viewport instead of scrolling, so
        // both numbers must be the screen's width.
        assert!(
            layout["inner"] == width && layout["scroll"].as_u64() <= Some(u64::from(width)),
            "{page} does not fit a {label} ({width} px wide): {layout}"
        );
        let png = browser.screenshot_at(width, mobile).await;
        let (png_width, _) = png_size(&png);
        assert_eq!(png_width, width, "{name}-{label}: the screenshot's width");
        if std::env::var("STEPGATE_WRITE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let path = screenshot_dir().join(format!("{name}-{label}.png"));
            std::fs::write(&path, &png)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }
    browser
        .devtools("Emulation.clearDeviceMetricsOverride", json!({}))
        .await;

    let foreign = browser
        .script(
            "return performance.getEntriesByType('resource').map(e => e.name)
               .filter(url => !url.startsWith(arguments[0] + '/'));",
            vec![Value::from(site.gate.clone())],
        )
        .await;
    assert_eq!(
        foreign,
        json!([]),
        "{page}: every asset comes from the gate itself"
    );
    let console = browser.severe_console_messages().await;
    assert!(
        console.is_empty(),
        "{page}: the browser reported errors (a CSP violation is one): {console:#?}"
    );
}

fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}
