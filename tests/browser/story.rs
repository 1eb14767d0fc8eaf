//! The whole story in a real browser: register a passkey on the passkeys page, ask the
//! exchange for `withdraw` (the gate holds it), confirm it on the gate's page with the tab's
//! virtual authenticator, see the countdown, and after the cooling-off finish it from the
//! exchange page. The confirm page is also driven with the keyboard alone.

use std::time::Duration;

use fantoccini::key::Key;

use crate::flows::{
    ask_for_withdrawals, check_and_capture, confirm_on_page, log_in, log_in_with_authenticator,
    open_confirm_page, register_passkey, wait_for_countdown,
};
use crate::harness::with_browser;
use crate::site::{summary_for, Site};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_registers_a_passkey_confirms_a_held_change_and_finishes_it_later() {
    with_browser(
        "a_person_registers_a_passkey_confirms_a_held_change_and_finishes_it_later",
        |browser| async move {
            let site = Site::start().await;
            let authenticator = log_in_with_authenticator(&browser, &site, "alice").await;
            let api = site.api("alice");
            let key_id = api.key_ids().await[0].clone();

            browser
                .goto(&format!("{}/_stepgate/passkeys", site.gate))
                .await;
            browser
                .wait_for_text("main", "the empty passkey list", |text| {
                    text.contains("You have no passkeys yet.")
                })
                .await;
            check_and_capture(&browser, &site, "passkeys-empty").await;

            register_passkey(&browser, &site, "Alice's laptop").await;
            assert_eq!(
                browser.credentials(&authenticator).await.len(),
                1,
                "the passkey lives in the tab's virtual authenticator"
            );
            let passkeys = api.get("/_stepgate/api/passkeys").await;
            assert_eq!(
                passkeys["passkeys"][0]["name"], "Alice's laptop",
                "{passkeys}"
            );
            check_and_capture(&browser, &site, "passkeys").await;

            let change_id = ask_for_withdrawals(&browser, &site, &key_id).await;
            assert_eq!(api.change_state(&change_id).await, "held");
            // The gate's 403 step_up_required is the protocol, but Chromium logs every 403.
            browser.severe_console_messages().await;
            check_and_capture(&browser, &site, "exchange-held").await;

            open_confirm_page(&browser, &site, &change_id).await;
            let headline = browser.text("h1.summary").await;
            assert_eq!(headline, summary_for(&key_id), "the page names the change");
            let warning = browser.text(".warning").await;
            assert!(
                warning.contains("No support agent"),
                "the page warns that nobody will ask for this: {warning}"
            );
            check_and_capture(&browser, &site, "confirm").await;

            confirm_on_page(&browser, &site, &change_id).await;
            let countdown = wait_for_countdown(&browser).await;
            assert!(
                countdown.starts_with("(in 23h ") || countdown.starts_with("(in 24h "),
                "a 24-hour cooling-off counts down from about a day: {countdown}"
            );
            assert!(
                !browser.exists("#confirm-button").await,
                "a confirmed change offers no second confirmation"
            );
            let eyebrow = browser.text(".eyebrow").await;
            assert!(
                eyebrow.starts_with("You confirmed this change."),
                "after confirming, the page is a result, not a question: {eyebrow}"
            );
            assert_eq!(api.change_state(&change_id).await, "cooling_off");
            check_and_capture(&browser, &site, "confirmed").await;

            // Before the cooling-off is over, finishing is refused with the time it may happen.
            browser.goto(&format!("{}/", site.gate)).await;
            browser.click("#step-up-finish").await;
            browser
                .wait_for_text("#step-up-result", "the cooling-off refusal", |text| {
                    text.starts_with("Still cooling off")
                })
                .await;
            assert_eq!(api.change_state(&change_id).await, "cooling_off");

            // A day later (the gate's clock; the first passkey's quarantine is a day too) the
            // exchange session has expired: log in again, and the page still knows the change.
            site.clock.advance(Duration::from_secs(24 * 3600 + 60));
            log_in(&browser, &site, "alice").await;
            let api = site.api("alice");
            browser.click("#step-up-finish").await;
            browser
                .wait_for_text("#status", "the finished change", |text| {
                    text.starts_with("Done: withdrawals enabled")
                })
                .await;
            assert_eq!(api.change_state(&change_id).await, "applied");
            let keys = api.keys().await;
            let key = keys
                .iter()
                .find(|key| key["id"] == key_id.as_str())
                .expect("the key is still there");
            assert!(
                key["permissions"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p == "withdraw")),
                "the exchange applied the change: {key}"
            );
        },
    )
    .await;
}

/// Tab through the confirm page from the top: the confirm and the cancel button are both
/// reached, carry their purpose as their name, and Enter on the confirm button confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirm_page_works_from_the_keyboard_alone() {
    with_browser(
        "the_confirm_page_works_from_the_keyboard_alone",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "kim").await;
            let api = site.api("kim");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Kim's phone").await;

            // The passkey name field has a visible label.
            browser
                .goto(&format!("{}/_stepgate/passkeys", site.gate))
                .await;
            browser
                .find("#passkey-name")
                .await
                .click()
                .await
                .expect("focus the name field");
            let field = browser.focused().await;
            assert_eq!(field["id"], "passkey-name");
            assert_eq!(field["name"], "Name for the new passkey", "{field}");

            let change_id = ask_for_withdrawals(&browser, &site, &key_id).await;
            open_confirm_page(&browser, &site, &change_id).await;

            let mut reached = Vec::new();
            for _ in 0..40 {
                browser.press(Key::Tab).await;
                let focused = browser.focused().await;
                if focused.is_null() {
                    continue;
                }
                let id = focused["id"].as_str().unwrap_or_default().to_string();
                reached.push(focused);
                if id == "cancel-button" {
                    break;
                }
            }
            let find = |id: &str| reached.iter().find(|f| f["id"] == id).cloned();
            let confirm = find("confirm-button")
                .unwrap_or_else(|| panic!("Tab never reached the confirm button: {reached:#?}"));
            let cancel = find("cancel-button")
                .unwrap_or_else(|| panic!("Tab never reached the cancel button: {reached:#?}"));
            assert_eq!(confirm["name"], "Confirm with my passkey");
            assert_eq!(cancel["name"], "Cancel this change");
            let confirm_at = reached.iter().position(|f| f["id"] == "confirm-button");
            let cancel_at = reached.iter().position(|f| f["id"] == "cancel-button");
            assert!(
                confirm_at < cancel_at,
                "confirm comes before cancel: {reached:#?}"
            );

            // Back one step to the confirm button, and Enter.
            browser.press_shift_tab().await;
            assert_eq!(browser.focused().await["id"], "confirm-button");
            browser.press(Key::Enter).await;
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
