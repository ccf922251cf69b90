//! Identities and who may do what: `aigrid key` (this user's own key, offline),
//! `aigrid whoami`, `aigrid identity` (admins), `aigrid circle` (members and roles)
//! and `aigrid apikey` (a circle's keys for `/v1`).

use std::path::{Path, PathBuf};

use aigrid_api::{
    AddIdentity, ApiKeyInfo, CircleInfo, CreateApiKey, CreatedApiKey, IdentityInfo, KeyAlgorithm,
    PublicKey, Role, SetMember, WhoAmI,
};
use anyhow::anyhow;
use clap::Subcommand;
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::keys;
use crate::output::{print_json, print_table, say};

/// `aigrid key ...`: this user's identity, on this machine.
#[derive(Subcommand)]
pub enum KeyCommand {
    /// Make a new identity (ed25519, or with --hybrid ed25519 + ML-DSA-65) in the
    /// --identity file (default: your config dir's aigrid/identity.json), mode 0600.
    /// An existing file is never replaced.
    New {
        /// A name for listings (default: your user name).
        #[arg(long)]
        name: Option<String>,
        /// Also sign with ML-DSA-65 (FIPS 204), a post-quantum scheme; both must verify.
        #[arg(long)]
        hybrid: bool,
    },
    /// Print the identity's id and public key (what an admin adds).
    Show {
        /// Print one line, `NAME=PUBLIC_KEY`: what `aigrid server --admin` and
        /// AIGRID_ADMINS take.
        #[arg(long)]
        admin_entry: bool,
    },
}

/// `aigrid identity ...`: the identities the cluster knows. Admins only.
#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Make a public key known to the cluster (`aigrid key show` prints one).
    Add {
        /// Its name.
        name: String,
        /// Its public key (`ed25519:...` or `ed25519+ml-dsa-65:...`).
        public_key: String,
        /// Make it a cluster admin.
        #[arg(long)]
        admin: bool,
    },
    /// List the known identities.
    Ls,
    /// Forget an identity and its roles (the last admin stays).
    Rm {
        /// The identity's id.
        id: String,
    },
}

/// `aigrid circle ...`: circles' members and their roles; governed circles'
/// members, weights and approval policy.
#[derive(Subcommand)]
pub enum CircleCommand {
    /// Make a governed circle: its members approve its guarded changes, M of N by
    /// weight. Admins.
    Create {
        /// The circle's name.
        name: String,
        /// A member, PUBLIC_KEY[:WEIGHT] (repeat for each; unknown keys are added
        /// as identities).
        #[arg(long = "member", required = true)]
        members: Vec<super::chain::MemberArg>,
        /// Total weight of approvals a guarded change needs.
        #[arg(long)]
        threshold: u32,
        #[command(flatten)]
        policy: super::chain::PolicyArgs,
    },
    /// List the circles you may see, with their members.
    Ls,
    /// Show one circle's members and, for a governed circle, its weights and policy.
    Show {
        /// The circle.
        circle: String,
    },
    /// Add or remove a governed circle's members.
    #[command(subcommand)]
    Member(super::chain::MemberCommand),
    /// Change a governed circle's policy.
    #[command(subcommand)]
    Policy(super::chain::PolicyCommand),
    /// Give an identity a role (viewer, operator, owner) in a circle. Admins and owners.
    Grant {
        /// The circle.
        circle: String,
        /// The member's identity id.
        member: String,
        /// viewer, operator or owner.
        #[arg(long)]
        role: Role,
    },
    /// Take an identity's role in a circle away. Admins and owners.
    Revoke {
        /// The circle.
        circle: String,
        /// The member's identity id.
        member: String,
    },
    /// A circle's quota, what it holds and borrows now, and its fair share.
    Usage {
        /// The circle.
        circle: String,
    },
    /// Set what a circle is guaranteed (admins); beyond it the circle borrows idle
    /// capacity, taken back when a circle within its quota needs it.
    Quota(super::usage::QuotaArgs),
}

/// `aigrid apikey ...`: keys for the OpenAI-compatible `/v1`, one circle each.
#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Make a key for a circle's models; it is shown once.
    Create {
        /// The circle.
        #[arg(long)]
        circle: String,
        /// A name for listings.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a circle's keys (never their secrets).
    Ls {
        /// The circle.
        #[arg(long)]
        circle: String,
    },
    /// Revoke a key at once.
    Revoke {
        /// The circle.
        #[arg(long)]
        circle: String,
        /// The key's id (the part after `aigrid-key.`).
        id: String,
    },
}

/// Runs `aigrid key`.
pub fn key(identity: Option<&Path>, cmd: KeyCommand, json: bool) -> anyhow::Result<()> {
    let path: PathBuf = keys::key_path(identity)?;
    let file = match cmd {
        KeyCommand::New { name, hybrid } => {
            let name = name
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "me".to_owned());
            let algorithm = if hybrid {
                KeyAlgorithm::Ed25519MlDsa65
            } else {
                KeyAlgorithm::Ed25519
            };
            let file = keys::create_key(&path, &name, algorithm)?;
            if !json {
                say(&format!(
                    "made identity {} in {}\n",
                    file.id,
                    path.display()
                ));
            }
            file
        }
        KeyCommand::Show { admin_entry } => {
            let file = keys::read_key(&path)?.0;
            if admin_entry {
                println!("{}={}", file.name, file.public_key);
                return Ok(());
            }
            file
        }
    };
    if json {
        return print_json(&serde_json::json!({
            "name": file.name,
            "id": file.id,
            "public_key": file.public_key,
            "type": file.public_key.algorithm(),
            "file": path,
        }));
    }
    say(&format!(
        "name        {}\nid          {}\nalgorithm   {}\npublic key  {}\n",
        file.name,
        file.id,
        file.public_key.algorithm(),
        file.public_key
    ));
    Ok(())
}

/// Runs `aigrid whoami`.
pub async fn whoami(client: &Client, json: bool) -> anyhow::Result<()> {
    let me: WhoAmI = client
        .call::<(), _>(Method::GET, "/api/v1/whoami", None)
        .await?;
    if json {
        return print_json(&me);
    }
    let mut text = format!(
        "id     {}\nname   {}\nadmin  {}\n",
        me.key_id,
        me.name.as_deref().unwrap_or("-"),
        if me.admin { "yes" } else { "no" }
    );
    for c in &me.circles {
        text.push_str(&format!("circle {} ({})\n", c.circle, c.role));
    }
    say(&text);
    Ok(())
}

fn print_identities(list: &[IdentityInfo]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.name.clone(),
                if i.admin { "admin" } else { "-" }.to_owned(),
                i.public_key.algorithm().to_string(),
            ]
        })
        .collect();
    print_table(0, &["ID", "NAME", "ADMIN", "ALGORITHM"], &rows);
}

/// Runs `aigrid identity`.
pub async fn identity(client: &Client, cmd: IdentityCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        IdentityCommand::Add {
            name,
            public_key,
            admin,
        } => {
            let public_key: PublicKey = public_key.parse().map_err(|e| anyhow!("{e}"))?;
            let request = AddIdentity {
                name,
                public_key,
                admin,
            };
            request.validate().map_err(|e| anyhow!("{e}"))?;
            let answer = client
                .call_guarded(Method::POST, "/api/v1/identities", Some(&request))
                .await?;
            let Some(info): Option<IdentityInfo> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&info);
            }
            print_identities(&[info]);
        }
        IdentityCommand::Ls => {
            let list: Vec<IdentityInfo> = client
                .call::<(), _>(Method::GET, "/api/v1/identities", None)
                .await?;
            if json {
                return print_json(&list);
            }
            print_identities(&list);
        }
        IdentityCommand::Rm { id } => {
            let path = format!("/api/v1/identities/{}", path_segment(&id)?);
            let answer = client
                .call_guarded::<(), _>(Method::DELETE, &path, None)
                .await?;
            let Some(info): Option<IdentityInfo> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&info);
            }
            say(&format!("removed identity {} ({})\n", info.id, info.name));
        }
    }
    Ok(())
}

fn print_circle(c: &CircleInfo) {
    println!("circle {}", c.name);
    let rows: Vec<Vec<String>> = c
        .members
        .iter()
        .map(|m| vec![m.identity.to_string(), m.name.clone(), m.role.to_string()])
        .collect();
    print_table(2, &["IDENTITY", "NAME", "ROLE"], &rows);
}

/// Runs `aigrid circle`.
pub async fn circle(client: &Client, cmd: CircleCommand, json: bool) -> anyhow::Result<()> {
    let one: CircleInfo = match cmd {
        CircleCommand::Ls => {
            let list: Vec<CircleInfo> = client
                .call::<(), _>(Method::GET, "/api/v1/circles", None)
                .await?;
            if json {
                return print_json(&list);
            }
            for c in &list {
                print_circle(c);
            }
            return Ok(());
        }
        CircleCommand::Show { circle } => {
            let path = format!("/api/v1/circles/{}", path_segment(&circle)?);
            let one: CircleInfo = client.call::<(), _>(Method::GET, &path, None).await?;
            let governed = super::chain::governance(client, &circle).await.ok();
            if json {
                let mut value = serde_json::to_value(&one)?;
                value["governance"] = serde_json::to_value(&governed)?;
                return print_json(&value);
            }
            print_circle(&one);
            if let Some(g) = &governed {
                super::chain::print_governance(g);
            }
            return Ok(());
        }
        CircleCommand::Create {
            name,
            members,
            threshold,
            policy,
        } => return super::chain::create(client, name, members, threshold, policy, json).await,
        CircleCommand::Member(cmd) => return super::chain::member(client, cmd, json).await,
        CircleCommand::Policy(cmd) => return super::chain::policy(client, cmd, json).await,
        CircleCommand::Usage { circle } => {
            return super::usage::circle_usage(client, &circle, json).await
        }
        CircleCommand::Quota(args) => return super::usage::quota(client, args, json).await,
        CircleCommand::Grant {
            circle,
            member,
            role,
        } => {
            let path = format!(
                "/api/v1/circles/{}/members/{}",
                path_segment(&circle)?,
                path_segment(&member)?
            );
            client
                .call(Method::PUT, &path, Some(&SetMember { role }))
                .await?
        }
        CircleCommand::Revoke { circle, member } => {
            let path = format!(
                "/api/v1/circles/{}/members/{}",
                path_segment(&circle)?,
                path_segment(&member)?
            );
            client.call::<(), _>(Method::DELETE, &path, None).await?
        }
    };
    if json {
        return print_json(&one);
    }
    print_circle(&one);
    Ok(())
}

/// Runs `aigrid apikey`.
pub async fn apikey(client: &Client, cmd: ApiKeyCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ApiKeyCommand::Create { circle, name } => {
            let path = format!("/api/v1/circles/{}/api-keys", path_segment(&circle)?);
            let request = CreateApiKey { name };
            request.validate().map_err(|e| anyhow!("{e}"))?;
            let answer = client
                .call_guarded(Method::POST, &path, Some(&request))
                .await?;
            let Some(created): Option<CreatedApiKey> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&created);
            }
            say(&format!(
                "{}\n(shown once: the servers keep only its hash; use it as `Authorization: Bearer` on /v1)\n",
                created.key
            ));
        }
        ApiKeyCommand::Ls { circle } => {
            let path = format!("/api/v1/circles/{}/api-keys", path_segment(&circle)?);
            let list: Vec<ApiKeyInfo> = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|k| {
                    vec![
                        k.id.clone(),
                        k.circle.clone(),
                        k.name.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(0, &["ID", "CIRCLE", "NAME"], &rows);
        }
        ApiKeyCommand::Revoke { circle, id } => {
            let path = format!(
                "/api/v1/circles/{}/api-keys/{}",
                path_segment(&circle)?,
                path_segment(&id)?
            );
            let answer = client
                .call_guarded::<(), _>(Method::DELETE, &path, None)
                .await?;
            let Some(info): Option<ApiKeyInfo> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&info);
            }
            say(&format!(
                "revoked API key {} of circle {}\n",
                info.id, info.circle
            ));
        }
    }
    Ok(())
}
