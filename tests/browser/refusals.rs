//! What must not work, in a real browser: a confirmation without user verification, a
//! confirmation whose passkey is gone, the confirm page inside another site's frame, and a
//! form on another site posting to the gate. Each refusal is a sentence on the page, and the
//! change stays as it was (checked through the API, not the page).

use serde_json::json;

use crate::flows::{
    assert_human_sentence, check_and_capture, hold_from_page_script, log_in_with_authenticator,
    open_confirm_page, register_passkey, wait_for_countdown,
};
use crate::harness::with_browser;
use crate::site::{summary_for, Site};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticator_that_cannot_verify_the_user_is_refused_and_the_change_stays_held() {
    with_browser(
        "an_authenticator_that_cannot_verify_the_user_is_refused_and_the_change_stays_held",
        |browser| async move {
            let site = Site::start().await;
            let authenticator = log_in_with_authenticator(&browser, &site, "dave").await;
            let api = site.api("dave");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Dave's key").await;
            let change_id = hold_from_page_script(&browser, &key_id).await;

            // No PIN, no fingerprint: the authenticator cannot say it is really the user.
            browser.set_user_verified(&authenticator, false).await;
            open_confirm_page(&browser, &site, &change_id).await;
            browser.click("#confirm-button").await;
            let refusal = browser
                .wait_for_text("#result.error", "a refusal", |text| !text.is_empty())
                .await;
            assert_human_sentence(&refusal, "the refusal without user verification");
            assert!(
                refusal.contains("could not check your PIN, fingerprint or face")
                    && refusal.contains("Nothing was changed"),
                "the refusal says why and that nothing happened: {refusal}"
            );
            assert_eq!(api.change_state(&change_id).await, "held");
            assert!(
                browser.exists("#confirm-button").await,
                "the page still offers the confirmation"
            );
            check_and_capture(&browser, &site, "confirm-refused").await;

            // With the check passing again, the same page confirms the same change.
            browser.set_user_verified(&authenticator, true).await;
            browser.click("#confirm-button").await;
            browser
                .wait_for_text("#result", "the confirmation", |text| {
                    text.starts_with("Confirmed.")
                })
                .await;
            wait_for_countdown(&browser).await;
            assert_eq!(api.change_state(&change_id).await, "cooling_off");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_that_is_gone_from_the_device_gives_a_clear_error() {
    with_browser(
        "a_passkey_that_is_gone_from_the_device_gives_a_clear_error",
        |browser| async move {
            let site = Site::start().await;
            let authenticator = log_in_with_authenticator(&browser, &site, "erin").await;
            let api = site.api("erin");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Erin's phone").await;
            let change_id = hold_from_page_script(&browser, &key_id).await;

            browser.remove_all_credentials(&authenticator).await;
            assert!(browser.credentials(&authenticator).await.is_empty());
            open_confirm_page(&browser, &site, &change_id).await;
            browser.click("#confirm-button").await;
            let error = browser
                .wait_for_text("#result.error", "an error", |text| !text.is_empty())
                .await;
            assert_human_sentence(&error, "the error without the passkey");
            assert!(
                error.contains("this device has no passkey for your account")
                    && error.contains("Nothing was changed"),
                "the error names the missing passkey and that nothing happened: {error}"
            );
            assert_eq!(api.change_state(&change_id).await, "held");
        },
    )
    .await;
}

/// Another site frames the confirm page (clickjacking: a fraudster's page with the gate's
/// button under a decoy). Chromium must refuse to render it — `frame-ancestors 'none'` and
/// `X-Frame-Options: DENY` — while a frameable page on another origin renders next to it, so
/// the test can tell "blocked" from "frames do not work here".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirm_page_does_not_render_inside_another_sites_frame() {
    with_browser(
        "the_confirm_page_does_not_render_inside_another_sites_frame",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "frank").await;
            let api = site.api("frank");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Frank's laptop").await;
            let change_id = hold_from_page_script(&browser, &key_id).await;
            let confirm_url = format!("{}/_stepgate/changes/{change_id}", site.gate);
            // Empty the console log, so what follows is only the framing page's.
            browser.severe_console_messages().await;

            let encode = |text: &str| {
                url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
            };
            let framing = format!(
                "{}/frame?url={}&control={}",
                site.other_site,
                encode(&confirm_url),
                encode(&format!("{}/frameable", site.other_origin)),
            );
            browser.goto(&framing).await;
            browser.find("#framed").await;

            // The control frame (another origin, no framing protection) renders.
            let control = browser.find("#control").await;
            browser
                .client
                .enter_frame(1)
                .await
                .expect("switch into the control frame");
            let control_text = browser.text("#control-text").await;
            assert_eq!(control_text, "A page that may be framed.");
            browser.client.enter_parent_frame().await.expect("back out");
            drop(control);

            // The gate's page does not: Chromium puts its own error page in the frame.
            browser
                .client
                .enter_frame(0)
                .await
                .expect("switch into the framed gate page");
            let inside = browser
                .script(
                    "return {url: location.href, text: document.body ? document.body.innerText : '',
                             confirm: !!document.getElementById('confirm-button')};",
                    vec![],
                )
                .await;
            browser.client.enter_parent_frame().await.expect("back out");
            assert_eq!(
                inside["confirm"],
                json!(false),
                "no confirm button in the frame: {inside}"
            );
            assert!(
                !inside["url"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&site.gate),
                "the frame did not load the gate's page: {inside}"
            );
            assert!(
                !inside["text"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(&summary_for(&key_id)),
                "the frame shows nothing of the change: {inside}"
            );
            let console = browser.severe_console_messages().await;
            assert!(
                console.iter().any(|m| m.contains("frame-ancestors 'none'")),
                "Chromium reports the frame-ancestors refusal: {console:#?}"
            );
            assert_eq!(api.change_state(&change_id).await, "held");
        },
    )
    .await;
}

/// A form on another site posting to the gate's cancel API: the browser marks it cross-site
/// and the gate refuses it, so the change is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_on_another_site_cannot_act_on_the_gate() {
    with_browser(
        "a_form_on_another_site_cannot_act_on_the_gate",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "grace").await;
            let api = site.api("grace");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Grace's phone").await;
            let change_id = hold_from_page_script(&browser, &key_id).await;

            for action in [
                format!("{}/_stepgate/api/changes/{change_id}/cancel", site.gate),
                format!(
                    "{}/_stepgate/api/changes/{change_id}/confirm/start",
                    site.gate
                ),
                format!("{}/_stepgate/api/passkeys/register/start", site.gate),
            ] {
                let page = format!(
                    "{}/post?url={}",
                    site.other_site,
                    url::form_urlencoded::byte_serialize(action.as_bytes()).collect::<String>()
                );
                browser.goto(&page).await;
                browser.click("#forged").await;
                let answer = browser
                    .wait_for_text("body", "the gate's answer", |text| {
                        text.contains("\"error\"")
                    })
                    .await;
                assert!(
                    answer.contains("\"cross_origin\""),
                    "{action}: the gate refuses the cross-site POST: {answer}"
                );
            }
            assert_eq!(api.change_state(&change_id).await, "held");
            assert_eq!(
                api.get("/_stepgate/api/passkeys").await["passkeys"]
                    .as_array()
                    .map(Vec::len),
                Some(1),
                "no registration was started for another site"
            );
        },
    )
    .await;
}

/// An unknown change is a page with a sentence, not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_change_is_a_page_with_a_sentence() {
    with_browser(
        "an_unknown_change_is_a_page_with_a_sentence",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "heidi").await;
            browser
                .goto(&format!(
                    "{}/_stepgate/changes/00000000-0000-4000-8000-000000000000",
                    site.gate
                ))
                .await;
            assert_eq!(browser.text("h1").await, "Not found");
            assert_human_sentence(&browser.text("p.message").await, "the not-found page");
            // The gate answered 404, which Chromium logs; that is the point of this page.
            browser.severe_console_messages().await;
            check_and_capture(&browser, &site, "not-found").await;

            // Signed out, a gate page says to sign in, in words.
            browser.client.delete_all_cookies().await.expect("sign out");
            browser
                .goto(&format!("{}/_stepgate/changes", site.gate))
                .await;
            assert_eq!(
                browser.text("h1").await,
                "Please sign in to the exchange first"
            );
            assert_human_sentence(&browser.text("p.message").await, "the signed-out page");
        },
    )
    .await;
}
