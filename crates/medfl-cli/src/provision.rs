//! `medfl provision`: creates the consortium's CA and a kit per participant, adds participants
//! later, revokes them, and lists what was issued.

use std::path::{Path, PathBuf};

use anyhow::Context;
use medfl_pki::{Ca, Kit, Role, CA_KEY_FILE, REVOKED_FILE};

/// `medfl provision`: `init` (also written without the word, `medfl provision --consortium ...`)
/// or another subcommand.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ProvisionArgs {
    /// What to do; `init` when only its options are given.
    #[command(subcommand)]
    command: Option<ProvisionCommand>,
    #[command(flatten)]
    init: Option<InitArgs>,
}

/// Options of `medfl provision init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The consortium's name (put in every certificate).
    #[arg(long, value_name = "NAME")]
    consortium: String,
    /// Where participants reach the coordinator (port 7070, the coordinator's default, when none is given).
    #[arg(long, value_name = "HOST[:PORT]")]
    coordinator: String,
    /// A hospital site (repeat, or separate with commas).
    #[arg(long = "site", value_name = "NAME", value_delimiter = ',')]
    sites: Vec<String>,
    /// A researcher (repeat, or separate with commas).
    #[arg(long = "researcher", value_name = "NAME", value_delimiter = ',')]
    researchers: Vec<String>,
    /// An operator (repeat, or separate with commas).
    #[arg(long = "operator", value_name = "NAME", value_delimiter = ',')]
    operators: Vec<String>,
    /// Where to write the kits, one directory each.
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// Where to create the CA [default: OUT/ca].
    #[arg(long, value_name = "DIR")]
    ca: Option<PathBuf>,
    /// Further host names or IP addresses the coordinator is reached at, put in its
    /// certificate (repeat, or separate with commas); kept for its renewals.
    #[arg(long = "coordinator-name", value_name = "HOST", value_delimiter = ',')]
    coordinator_names: Vec<String>,
    /// Days each certificate is valid (1 to 3650) [default: 730].
    #[arg(long, value_name = "DAYS")]
    valid_days: Option<u32>,
}

/// How long certificates are valid.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Validity {
    /// Days each certificate is valid (1 to 3650).
    #[arg(long, value_name = "DAYS", default_value_t = medfl_pki::DEFAULT_VALID_DAYS)]
    valid_days: u32,
}

/// `medfl provision` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ProvisionCommand {
    /// Create the consortium CA, the coordinator's kit and one kit per participant.
    Init(InitArgs),
    /// Issue a kit for a new site.
    AddSite(AddArgs),
    /// Issue a kit for a new researcher.
    AddResearcher(AddArgs),
    /// Issue a kit for a new operator.
    AddOperator(AddArgs),
    /// A new key and certificate for a participant whose certificate expires soon, in a new
    /// kit; the old certificate stays valid until it expires, so the kit can be swapped
    /// without a gap.
    Renew(AddArgs),
    /// A new key and certificate for a participant who lost its key, or was revoked and is let
    /// back in: whatever certificate it still holds is revoked first.
    Reissue(AddArgs),
    /// Revoke a participant's certificates; coordinators reading the revocation list refuse
    /// them from then on.
    Revoke {
        /// The participant.
        name: String,
        /// The CA directory.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
    },
    /// List every certificate the CA issued.
    List {
        /// The CA directory.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
    },
}

/// Arguments of the subcommands that issue one kit: `add-*`, `renew` and `reissue`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The participant's name (letters, digits, '-', '_', '.').
    name: String,
    /// The CA directory.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Where to write the kit (into OUT/NAME, which must not exist yet).
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    validity: Validity,
}

impl ProvisionArgs {
    /// The subcommand, `init` when only its options were given.
    pub fn command(self) -> anyhow::Result<ProvisionCommand> {
        match (self.command, self.init) {
            (Some(command), _) => Ok(command),
            (None, Some(init)) => Ok(ProvisionCommand::Init(init)),
            // clap already asks for init's options when no subcommand is given.
            (None, None) => anyhow::bail!(
                "medfl provision needs a subcommand or init's options \
                 (--consortium NAME --coordinator HOST[:PORT] -o DIR)"
            ),
        }
    }
}

/// Runs `medfl provision`.
pub fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    match args.command()? {
        ProvisionCommand::Init(InitArgs {
            consortium,
            coordinator,
            sites,
            researchers,
            operators,
            out,
            ca,
            coordinator_names,
            valid_days,
        }) => {
            let done = medfl_pki::provision_with(
                ca.as_deref(),
                &consortium,
                &coordinator,
                (&sites, &researchers, &operators),
                &out,
                &medfl_pki::IssueOptions {
                    valid_days: valid_days.unwrap_or(medfl_pki::DEFAULT_VALID_DAYS),
                    coordinator_names,
                },
            )
            .context("provisioning the consortium")?;
            medfl_daemon::outln!(
                "Created the CA of {consortium:?} in {}\n  CA certificate SHA-256 {}\n",
                done.ca_dir.display(),
                done.ca_sha256_hex
            );
            print_kits(&done.kits);
            print_next_steps(&done.ca_dir, &done.kits);
        }
        ProvisionCommand::AddSite(args) => add(Role::Site, args)?,
        ProvisionCommand::AddResearcher(args) => add(Role::Researcher, args)?,
        ProvisionCommand::AddOperator(args) => add(Role::Operator, args)?,
        ProvisionCommand::Renew(args) => {
            let mut ca = open(&args.ca)?;
            let kit = ca
                .renew_kit(&args.name, &args.out, args.validity.valid_days)
                .with_context(|| format!("renewing {:?}", args.name))?;
            print_kits(std::slice::from_ref(&kit));
            medfl_daemon::outln!(
                "\nNext: put the new kit in place of the old one and restart {:?}; its earlier \
                 certificate stays valid until it expires.",
                args.name
            );
        }
        ProvisionCommand::Reissue(args) => {
            let mut ca = open(&args.ca)?;
            let (revoked, kit) = ca
                .reissue_kit(&args.name, &args.out, args.validity.valid_days)
                .with_context(|| format!("reissuing {:?}", args.name))?;
            for r in &revoked {
                medfl_daemon::outln!("Revoked the certificate with serial {} first.", r.serial);
            }
            print_kits(std::slice::from_ref(&kit));
            medfl_daemon::outln!(
                "\nNext: copy {} over the coordinator's revocation_list (it refuses the old \
                 certificates without a restart), and give {:?} the new kit.",
                args.ca.join(REVOKED_FILE).display(),
                args.name
            );
        }
        ProvisionCommand::Revoke { name, ca } => {
            let mut authority = open(&ca)?;
            let revoked = authority
                .revoke(&name)
                .with_context(|| format!("revoking {name:?}"))?;
            let list = ca.join(REVOKED_FILE);
            medfl_daemon::outln!(
                "Revoked {} {:?} (serial {}) at {}.\nWrote {}.",
                revoked.role,
                revoked.name,
                revoked.serial,
                revoked.revoked_at.unwrap_or_default(),
                list.display()
            );
            medfl_daemon::outln!(
                "\nNext: copy {} over the coordinator's revocation_list (or point \
                 revocation_list at it);\nthe coordinator re-reads it and refuses {name:?} \
                 from its next request, without a restart.",
                list.display()
            );
        }
        ProvisionCommand::List { ca } => {
            let authority = open(&ca)?;
            let consortium = authority.consortium();
            medfl_daemon::outln!(
                "{:?}: coordinator {}, CA SHA-256 {}\n",
                consortium.name,
                consortium.coordinator().url(),
                consortium.ca_sha256
            );
            medfl_daemon::outln!(
                "{:<12} {:<24} {:<21} {:<21} SERIAL",
                "ROLE",
                "NAME",
                "EXPIRES",
                "REVOKED"
            );
            for p in &consortium.participants {
                medfl_daemon::outln!(
                    "{:<12} {:<24} {:<21} {:<21} {}",
                    p.role.as_str(),
                    p.name,
                    p.not_after,
                    p.revoked_at.as_deref().unwrap_or("-"),
                    p.serial
                );
            }
        }
    }
    Ok(())
}

fn open(ca: &Path) -> anyhow::Result<Ca> {
    Ca::open(ca).with_context(|| format!("opening the CA in {}", ca.display()))
}

fn add(role: Role, args: AddArgs) -> anyhow::Result<()> {
    let mut ca = open(&args.ca)?;
    let kit = ca
        .issue_kit_for(role, &args.name, &args.out, args.validity.valid_days)
        .with_context(|| format!("adding {role} {:?}", args.name))?;
    print_kits(std::slice::from_ref(&kit));
    print_next_steps(&args.ca, std::slice::from_ref(&kit));
    Ok(())
}

fn print_kits(kits: &[Kit]) {
    medfl_daemon::outln!("{:<12} {:<24} {:<21} KIT", "ROLE", "NAME", "EXPIRES");
    for kit in kits {
        medfl_daemon::outln!(
            "{:<12} {:<24} {:<21} {}\n{:<12} certificate SHA-256 {}",
            kit.role.as_str(),
            kit.name,
            kit.not_after,
            kit.dir.display(),
            "",
            kit.sha256_hex
        );
    }
}

fn print_next_steps(ca_dir: &Path, kits: &[Kit]) {
    medfl_daemon::outln!("\nNext steps:");
    medfl_daemon::outln!(
        "  1. Copy each kit directory to its participant only, over a channel you trust; \
         a kit's .key file is its participant's private key and never leaves the kit."
    );
    for kit in kits {
        let config = kit.config.display();
        match kit.role {
            Role::Coordinator => medfl_daemon::outln!(
                "     coordinator: medfl-coordinator --config {config} \
                 (in the kit's directory, or with the paths adjusted)"
            ),
            Role::Site => medfl_daemon::outln!(
                "     site {}: edit its [datasets] in {config}, then medfl-site --config {config}",
                kit.name
            ),
            Role::Researcher | Role::Operator => {
                medfl_daemon::outln!("     {} {}: use {config} with medfl", kit.role, kit.name)
            }
        }
    }
    medfl_daemon::outln!(
        "  2. Keep {} offline and backed up: {CA_KEY_FILE} can issue certificates for the whole \
         consortium and belongs in no kit.",
        ca_dir.display()
    );
    medfl_daemon::outln!(
        "  3. Compare the SHA-256 fingerprints above with each participant when they receive \
         their kit."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProvisionArgs,
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_add_and_revoke_end_to_end() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("kits");
        let out_arg = out.to_string_lossy().into_owned();
        let ca_arg = out.join("ca").to_string_lossy().into_owned();
        let cli = Cli::try_parse_from([
            "provision",
            "init",
            "--consortium",
            "Net",
            "--coordinator",
            "coord.example.org:9443",
            "--site",
            "hospital-a,hospital-b",
            "--researcher",
            "alice",
            "--coordinator-name",
            "lb.example.org",
            "-o",
            &out_arg,
        ])?;
        match &cli.args.command {
            Some(ProvisionCommand::Init(InitArgs { sites, ca, .. })) => {
                assert_eq!(sites, &["hospital-a", "hospital-b"]);
                assert!(ca.is_none());
            }
            other => panic!("{other:?}"),
        }
        run(cli.args)?;
        assert!(out.join("hospital-b/site.toml").is_file());

        let cli = Cli::try_parse_from([
            "provision",
            "add-site",
            "hospital-c",
            "--ca",
            &ca_arg,
            "-o",
            &out_arg,
        ])?;
        run(cli.args)?;
        assert!(out.join("hospital-c/hospital-c.key").is_file());

        let cli = Cli::try_parse_from(["provision", "revoke", "hospital-a", "--ca", &ca_arg])?;
        run(cli.args)?;
        let list = medfl_pki::RevocationList::load(&out.join("ca").join(REVOKED_FILE))?;
        assert_eq!(list.revoked[0].name, "hospital-a");

        let cli = Cli::try_parse_from(["provision", "list", "--ca", &ca_arg])?;
        run(cli.args)?;

        let cli = Cli::try_parse_from([
            "provision",
            "add-site",
            "hospital-c",
            "--ca",
            &ca_arg,
            "-o",
            &out_arg,
        ])?;
        let err = format!("{:#}", run(cli.args).unwrap_err());
        assert!(err.contains("hospital-c"), "{err}");

        // Renewed into a new kit directory, for 30 days; the old kit's certificate stays valid.
        let renewed = dir.path().join("kits-2027");
        let renewed_arg = renewed.to_string_lossy().into_owned();
        let cli = Cli::try_parse_from([
            "provision",
            "renew",
            "hospital-b",
            "--ca",
            &ca_arg,
            "-o",
            &renewed_arg,
            "--valid-days",
            "30",
        ])?;
        run(cli.args)?;
        assert!(renewed.join("hospital-b/hospital-b.key").is_file());
        let ca = Ca::open(&out.join("ca"))?;
        let records: Vec<_> = ca
            .consortium()
            .participants
            .iter()
            .filter(|p| p.name == "hospital-b")
            .collect();
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|p| !p.revoked));
        assert_eq!(ca.consortium().coordinator_names, ["lb.example.org"]);
        // A revoked site is not renewed but reissued.
        let cli = Cli::try_parse_from([
            "provision",
            "renew",
            "hospital-a",
            "--ca",
            &ca_arg,
            "-o",
            &renewed_arg,
        ])?;
        let err = format!("{:#}", run(cli.args).unwrap_err());
        assert!(
            err.contains("hospital-a") && err.contains("revoked"),
            "{err}"
        );
        let cli = Cli::try_parse_from([
            "provision",
            "reissue",
            "hospital-a",
            "--ca",
            &ca_arg,
            "-o",
            &renewed_arg,
        ])?;
        run(cli.args)?;
        assert!(renewed.join("hospital-a/site.toml").is_file());
        let cli = Cli::try_parse_from([
            "provision",
            "add-site",
            "hospital-d",
            "--ca",
            &ca_arg,
            "-o",
            &out_arg,
            "--valid-days",
            "0",
        ])?;
        let err = format!("{:#}", run(cli.args).unwrap_err());
        assert!(err.contains("1 to 3650"), "{err}");
        Ok(())
    }
}
