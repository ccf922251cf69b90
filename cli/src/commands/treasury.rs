//! `aigrid treasury`: a circle's balance and ledger, deposits (admins), transfers
//! out (through the circle's quorum), every account (admins), and a farmer's
//! earnings.

use aigrid_api::{Accounts, Credits, Deposit, LedgerEntry, LedgerPage, Transfer, TreasuryView};
use clap::Subcommand;
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{ms_to_text, print_json, print_table};

/// `aigrid treasury ...`.
#[derive(Subcommand)]
pub enum TreasuryCommand {
    /// A circle's balance, what it accrued since the last settlement, its rate now,
    /// and whether its new work is held for want of credits.
    Show {
        /// The circle.
        circle: String,
    },
    /// Record credits coming in for a circle from outside the grid (admins); the
    /// first deposit opens its treasury, and its use is charged from then on.
    Deposit {
        /// The circle.
        circle: String,
        /// Credits, a decimal with at most 6 places (`100`, `12.5`).
        amount: String,
        /// A note for the ledger (a payment reference).
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// The entries debiting or crediting a circle, newest first.
    Ledger {
        /// The circle.
        circle: String,
        /// Entries shown, 1 to 1000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move credits out of a circle: always proposed to its quorum.
    Transfer {
        /// The circle paying.
        circle: String,
        /// The account credited: circle:NAME, farmer:IDENTITY, node:ID or external.
        to: String,
        /// Credits.
        amount: String,
        /// A note for the ledger.
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// Every account's balance and their sum, which is zero (admins).
    Accounts,
    /// What a farmer's nodes earned, newest first (that farmer, and admins).
    Farmer {
        /// The farmer's identity id.
        farmer: String,
        /// Entries shown, 1 to 1000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn amount(text: &str) -> anyhow::Result<Credits> {
    let amount: Credits = text.parse().map_err(anyhow::Error::msg)?;
    amount.check("amount", false)?;
    Ok(amount)
}

/// Runs a treasury subcommand.
pub async fn treasury(client: &Client, cmd: TreasuryCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        TreasuryCommand::Show { circle } => {
            let path = format!("/api/v1/treasury/{}", path_segment(&circle)?);
            let view: TreasuryView = client.call::<(), _>(Method::GET, &path, None).await?;
            print_view(&view, json)
        }
        TreasuryCommand::Deposit {
            circle,
            amount: text,
            memo,
        } => {
            let request = Deposit {
                amount: amount(&text)?,
                memo,
            };
            aigrid_api::treasury::check_memo(&request.memo)?;
            let path = format!("/api/v1/treasury/{}/deposits", path_segment(&circle)?);
            let view: TreasuryView = client.call(Method::POST, &path, Some(&request)).await?;
            print_view(&view, json)
        }
        TreasuryCommand::Ledger { circle, limit } => {
            let path = format!(
                "/api/v1/treasury/{}/ledger?limit={limit}",
                path_segment(&circle)?
            );
            let page: LedgerPage = client.call::<(), _>(Method::GET, &path, None).await?;
            print_ledger(&page, json)
        }
        TreasuryCommand::Transfer {
            circle,
            to,
            amount: text,
            memo,
        } => {
            let request = Transfer {
                to,
                amount: amount(&text)?,
                memo,
            };
            aigrid_api::treasury::check_account(&request.to)?;
            aigrid_api::treasury::check_memo(&request.memo)?;
            let path = format!("/api/v1/treasury/{}/transfers", path_segment(&circle)?);
            let answer = client
                .call_guarded(Method::POST, &path, Some(&request))
                .await?;
            if let Some(view) = proposed_or::<TreasuryView>(answer, json)? {
                print_view(&view, json)?;
            }
            Ok(())
        }
        TreasuryCommand::Accounts => {
            let accounts: Accounts = client
                .call::<(), _>(Method::GET, "/api/v1/treasury", None)
                .await?;
            if json {
                return print_json(&accounts);
            }
            let rows: Vec<Vec<String>> = accounts
                .balances
                .iter()
                .map(|(a, b)| vec![a.clone(), b.to_string()])
                .collect();
            print_table(0, &["ACCOUNT", "BALANCE"], &rows);
            println!("sum {} over {} entries", accounts.sum, accounts.entries);
            Ok(())
        }
        TreasuryCommand::Farmer { farmer, limit } => {
            let path = format!(
                "/api/v1/farmers/{}/ledger?limit={limit}",
                path_segment(&farmer)?
            );
            let page: LedgerPage = client.call::<(), _>(Method::GET, &path, None).await?;
            print_ledger(&page, json)
        }
    }
}

fn print_view(view: &TreasuryView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(view);
    }
    if !view.open {
        println!(
            "circle {} has no treasury: its use is metered (aigrid usage) but not charged \
             until its first deposit",
            view.circle
        );
        return Ok(());
    }
    println!("circle     {}", view.circle);
    println!("balance    {} credits", view.balance);
    println!("accrued    {} (settled next)", view.accrued);
    println!("available  {}", view.available);
    println!("rate       {} per hour", view.rate_per_hour);
    println!("spent 24h  {}", view.spent_24h);
    if let Some(at) = view.settled_until {
        println!("settled    until {}", ms_to_text(at.as_millis()));
    }
    if let Some(hold) = &view.hold {
        println!("held       {hold}");
    }
    Ok(())
}

fn print_ledger(page: &LedgerPage, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(page);
    }
    println!("{}: balance {}", page.account, page.balance);
    let rows: Vec<Vec<String>> = page.entries.iter().map(row).collect();
    print_table(
        0,
        &["SEQ", "AT", "KIND", "FROM", "TO", "AMOUNT", "MEMO"],
        &rows,
    );
    Ok(())
}

fn row(e: &LedgerEntry) -> Vec<String> {
    vec![
        e.seq.to_string(),
        ms_to_text(e.at.as_millis()),
        serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        e.from.clone(),
        e.to.clone(),
        e.amount.to_string(),
        e.memo.clone(),
    ]
}
