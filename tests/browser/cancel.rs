//! Stopping a change in a real browser: from the changes page (every pending change, a live
//! countdown on the cooling-off ones, a cancel button on each), and from the one-click link
//! the user gets by mail.

use crate::flows::{
    assert_human_sentence, check_and_capture, confirm_on_page, hold_from_page_script, is_countdown,
    log_in_with_authenticator, register_passkey, wait_for_countdown,
};
use crate::harness::with_browser;
use crate::site::{summary_for, Site};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_cancelled_from_the_changes_page() {
    with_browser(
        "a_change_is_cancelled_from_the_changes_page",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "bob").await;
            let api = site.api("bob");
            let keys = api.key_ids().await;
            register_passkey(&browser, &site, "Bob's phone").await;

            // One change confirmed (cooling off, with a countdown), one still held.
            let confirmed = hold_from_page_script(&browser, &keys[0]).await;
            confirm_on_page(&browser, &site, &confirmed).await;
            wait_for_countdown(&browser).await;
            let held = hold_from_page_script(&browser, &keys[1]).await;

            browser
                .goto(&format!("{}/_stepgate/changes", site.gate))
                .await;
            let rows = browser
                .client
                .find_all(fantoccini::Locator::Css("li.change-row"))
                .await
                .expect("list the changes");
            assert_eq!(rows.len(), 2, "both pending changes are listed");
            let countdown = browser
                .wait_for_text(
                    "li.state-cooling_off .countdown",
                    "a live countdown",
                    is_countdown,
                )
                .await;
            assert!(
                countdown.starts_with("(in 2"),
                "about a day left: {countdown}"
            );
            let summary = browser.text("li.state-held a.summary").await;
            assert_eq!(summary, summary_for(&keys[1]));
            check_and_capture(&browser, &site, "changes").await;

            let button = format!(".cancel-button[data-change-id='{held}']");
            let label = browser
                .find(&button)
                .await
                .attr("aria-label")
                .await
                .expect("read the label");
            assert_eq!(
                label.as_deref(),
                Some(format!("Cancel: {}", summary_for(&keys[1])).as_str()),
                "each cancel button says which change it cancels"
            );
            browser.click(&button).await;
            let result = browser
                .wait_for_text("#result", "the cancellation", |text| !text.is_empty())
                .await;
            assert_eq!(result, "The change was cancelled. Nothing will happen.");
            assert_eq!(api.change_state(&held).await, "cancelled");
            assert_eq!(
                api.change_state(&confirmed).await,
                "cooling_off",
                "only that change was cancelled"
            );

            // After the reload the cancelled change offers no cancel button any more.
            browser
                .wait_for_text("li.state-cancelled", "the cancelled row", |text| {
                    text.contains(&summary_for(&keys[1]))
                })
                .await;
            assert!(!browser.exists(&button).await);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_cancelled_with_one_click_from_the_mailed_link() {
    with_browser(
        "a_change_is_cancelled_with_one_click_from_the_mailed_link",
        |browser| async move {
            let site = Site::start().await;
            log_in_with_authenticator(&browser, &site, "carol").await;
            let api = site.api("carol");
            let key_id = api.key_ids().await[0].clone();
            register_passkey(&browser, &site, "Carol's laptop").await;
            let change_id = hold_from_page_script(&browser, &key_id).await;
            confirm_on_page(&browser, &site, &change_id).await;

            // The link from the gate's change.confirmed notification, as the mail carries it.
            let cancel_url = site.cancel_url(&change_id).await;
            assert!(cancel_url.starts_with(&format!("{}/_stepgate/cancel/", site.gate)));
            browser.goto(&cancel_url).await;
            assert_eq!(browser.text("h1.summary").await, summary_for(&key_id));
            assert_eq!(
                api.change_state(&change_id).await,
                "cooling_off",
                "opening the link (a GET) cancels nothing"
            );
            check_and_capture(&browser, &site, "cancel-link").await;

            browser
                .click("section.change form button[type=submit]")
                .await;
            browser
                .wait_for_text("h1", "the cancelled page", |text| text == "Cancelled")
                .await;
            assert_human_sentence(&browser.text("p.result").await, "the cancelled page");
            assert_eq!(api.change_state(&change_id).await, "cancelled");
            check_and_capture(&browser, &site, "cancel-link-done").await;
        },
    )
    .await;
}
