//! The embedded entitlement policy: a default seat limit, plans with their limits and
//! device rules, users mapped to plans, content allow and deny lists, and region
//! restrictions, from flags or a TOML file (see `docs/entitlements.example.toml`).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    DeviceRules, Entitlement, EntitlementError, EntitlementProvider, EntitlementQuery, Grant,
    MAX_SEAT_LIMIT, MissingRegion,
};
use crate::error::Denial;
use crate::files::{FileError, read_toml};
use crate::ids::ContentId;
use crate::store::RateLimit;

/// A plan's `create_burst` when it sets `create_rate` alone.
pub const DEFAULT_CREATE_BURST: u32 = 10;

/// The TOML file, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Seats of users with no plan; the `--default-seat-limit` flag wins when set.
    pub default_seat_limit: Option<u32>,
    #[serde(default)]
    pub plans: HashMap<String, Plan>,
    /// User id -> plan name.
    #[serde(default)]
    pub users: HashMap<String, String>,
    #[serde(default)]
    pub content: ContentRules,
    #[serde(default)]
    pub regions: RegionRules,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// 0 denies playback (a suspended account).
    pub seat_limit: u32,
    /// The devices the plan allows, their resolutions and DRM.
    #[serde(default)]
    pub devices: DeviceRules,
    /// How fast the plan's users may start sessions (`N/s`, `N/m`, `N/h` or `off`);
    /// absent: the server's `--create-rate`.
    #[serde(default)]
    pub create_rate: Option<String>,
    /// The burst of `create_rate` (default 10).
    #[serde(default)]
    pub create_burst: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentRules {
    /// When not empty, only these titles play.
    #[serde(default)]
    pub allow: Vec<String>,
    /// These titles never play.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Title -> the only regions it plays in.
    #[serde(default)]
    pub regions: HashMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRules {
    /// When not empty, only these regions play.
    #[serde(default)]
    pub allow: Vec<String>,
    /// These regions never play.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The policy, checked and ready to answer.
#[derive(Clone, Debug)]
pub struct StaticPolicy {
    default_seat_limit: u32,
    user_plans: HashMap<String, Plan>,
    /// The create rate limit of each user whose plan sets one (`None`: off).
    user_rates: HashMap<String, Option<RateLimit>>,
    content_allow: HashSet<String>,
    content_deny: HashSet<String>,
    content_regions: HashMap<String, HashSet<String>>,
    region_allow: HashSet<String>,
    region_deny: HashSet<String>,
    missing_region: MissingRegion,
}

/// Why an entitlement policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{what}: seat limit {limit} is over {MAX_SEAT_LIMIT}")]
    SeatLimit { what: String, limit: u32 },
    #[error("{what}: {region:?} is not an upper-case ISO 3166-1 alpha-2 code")]
    Region { what: String, region: String },
    #[error("users.{user}: no plan named {plan:?}")]
    UnknownPlan { user: String, plan: String },
    #[error("plans.{plan}.create_rate: {problem}")]
    CreateRate { plan: String, problem: String },
    #[error("plans.{plan}.devices.{field}: {name:?} is not a device type")]
    DeviceType {
        plan: String,
        field: &'static str,
        name: String,
    },
}

fn check_limit(what: &str, limit: u32) -> Result<u32, PolicyError> {
    if limit > MAX_SEAT_LIMIT {
        return Err(PolicyError::SeatLimit {
            what: what.to_owned(),
            limit,
        });
    }
    Ok(limit)
}

fn check_region(what: &str, region: &str) -> Result<String, PolicyError> {
    if region.len() == 2 && region.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(region.to_owned())
    } else {
        Err(PolicyError::Region {
            what: what.to_owned(),
            region: region.to_owned(),
        })
    }
}

impl StaticPolicy {
    /// Everyone may play everything with `default_seat_limit` seats.
    pub fn open(default_seat_limit: u32) -> Result<Self, PolicyError> {
        Self::from_file(PolicyFile::default(), Some(default_seat_limit))
    }

    /// Reads and checks a TOML policy file. `default_seat_limit` overrides the file's.
    pub fn load(path: &Path, default_seat_limit: Option<u32>) -> Result<Self, PolicyError> {
        let file: PolicyFile = read_toml(path)?;
        Self::from_file(file, default_seat_limit)
    }

    /// Checks a parsed policy: every user's plan exists, limits are in range, regions are
    /// ISO codes.
    pub fn from_file(
        file: PolicyFile,
        default_seat_limit: Option<u32>,
    ) -> Result<Self, PolicyError> {
        let default_seat_limit = check_limit(
            "default_seat_limit",
            default_seat_limit.or(file.default_seat_limit).unwrap_or(2),
        )?;
        let mut plan_rates = HashMap::new();
        for (name, plan) in &file.plans {
            check_limit(&format!("plans.{name}"), plan.seat_limit)?;
            if let Some(rate) = &plan.create_rate {
                let burst = plan.create_burst.unwrap_or(DEFAULT_CREATE_BURST);
                let rate =
                    RateLimit::parse(rate, burst).map_err(|problem| PolicyError::CreateRate {
                        plan: name.clone(),
                        problem,
                    })?;
                plan_rates.insert(name.clone(), rate);
            }
            if let Some((field, unknown)) = plan.devices.unknown_name() {
                return Err(PolicyError::DeviceType {
                    plan: name.clone(),
                    field,
                    name: unknown.to_owned(),
                });
            }
        }
        let user_plans = file
            .users
            .iter()
            .map(|(user, plan)| {
                file.plans
                    .get(plan)
                    .map(|p| (user.clone(), p.clone()))
                    .ok_or_else(|| PolicyError::UnknownPlan {
                        user: user.clone(),
                        plan: plan.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let user_rates = file
            .users
            .iter()
            .filter_map(|(user, plan)| Some((user.clone(), *plan_rates.get(plan)?)))
            .collect();
        let regions = |what: &str, list: &[String]| {
            list.iter()
                .map(|r| check_region(what, r))
                .collect::<Result<HashSet<_>, _>>()
        };
        let content_regions = file
            .content
            .regions
            .iter()
            .map(|(title, list)| {
                Ok((
                    title.clone(),
                    regions(&format!("content.regions.{title}"), list)?,
                ))
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self {
            default_seat_limit,
            user_plans,
            user_rates,
            content_allow: file.content.allow.into_iter().collect(),
            content_deny: file.content.deny.into_iter().collect(),
            content_regions,
            region_allow: regions("regions.allow", &file.regions.allow)?,
            region_deny: regions("regions.deny", &file.regions.deny)?,
            missing_region: MissingRegion::Refuse,
        })
    }

    /// The same policy, with what a request for a region-restricted title that gives
    /// no region gets.
    pub fn with_missing_region(mut self, missing_region: MissingRegion) -> Self {
        self.missing_region = missing_region;
        self
    }

    /// Whether any region rule applies to `content`: a global allow or deny list, or a
    /// list of the title's own.
    fn region_restricted(&self, content: &ContentId) -> bool {
        !self.region_allow.is_empty()
            || !self.region_deny.is_empty()
            || self.content_regions.contains_key(content.as_str())
    }

    pub(super) fn decide(&self, query: EntitlementQuery<'_>) -> Entitlement {
        let plan = self.user_plans.get(query.user.as_str());
        let seat_limit = plan.map_or(self.default_seat_limit, |p| p.seat_limit);
        if seat_limit == 0 {
            return Entitlement::Denied(Denial::Entitlement);
        }
        let rules = match plan.map(|p| p.devices.apply(query.device)) {
            None => Default::default(),
            Some(Ok(rules)) => rules,
            Some(Err(denial)) => return Entitlement::Denied(denial),
        };
        if let Some(content) = query.content {
            let content = content.as_str();
            let listed = self.content_allow.is_empty() || self.content_allow.contains(content);
            if !listed || self.content_deny.contains(content) {
                return Entitlement::Denied(Denial::Content);
            }
        }
        let unknown_region = query.region.is_none()
            && self.missing_region == MissingRegion::Refuse
            && query.content.is_some_and(|c| self.region_restricted(c));
        if unknown_region {
            // Fail closed: a restricted title with no region could be played anywhere.
            return Entitlement::Denied(Denial::RegionRequired);
        }
        if let Some(region) = query.region {
            let region_ok = (self.region_allow.is_empty() || self.region_allow.contains(region))
                && !self.region_deny.contains(region);
            let title_ok = query
                .content
                .and_then(|c| self.content_regions.get(c.as_str()))
                .is_none_or(|allowed| allowed.contains(region));
            if !region_ok || !title_ok {
                return Entitlement::Denied(Denial::Geo);
            }
        }
        let create_rate = self.user_rates.get(query.user.as_str()).copied();
        Entitlement::Allowed(Grant {
            seat_limit,
            rules,
            manifest: None,
            create_rate,
        })
    }
}

#[async_trait]
impl EntitlementProvider for StaticPolicy {
    async fn check(&self, query: EntitlementQuery<'_>) -> Result<Entitlement, EntitlementError> {
        Ok(self.decide(query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ContentId, UserId};
    use crate::model::DeviceType;

    const POLICY: &str = r#"
        default_seat_limit = 2
        [plans.premium]
        seat_limit = 4
        [plans.suspended]
        seat_limit = 0
        [users]
        alice = "premium"
        mallory = "suspended"
        [content]
        deny = ["withdrawn"]
        regions = { "us-only" = ["US"] }
        [regions]
        deny = ["KP"]
    "#;

    fn policy() -> StaticPolicy {
        StaticPolicy::from_file(toml::from_str(POLICY).unwrap(), None).unwrap()
    }

    fn ask(user: &str, content: &str, region: Option<&str>) -> Entitlement {
        let user = UserId::parse("u", user).unwrap();
        let content = ContentId::parse("c", content).unwrap();
        policy().decide(EntitlementQuery {
            user: &user,
            profile: None,
            content: Some(&content),
            region,
            device: None,
            deadline: Default::default(),
        })
    }

    #[test]
    fn plans_set_the_seat_limit() {
        assert_eq!(
            ask("alice", "t", Some("US")),
            Entitlement::Allowed(Grant::seats(4))
        );
        assert_eq!(
            ask("bob", "t", Some("US")),
            Entitlement::Allowed(Grant::seats(2))
        );
        assert_eq!(
            ask("mallory", "t", Some("US")),
            Entitlement::Denied(Denial::Entitlement)
        );
    }

    /// Geo rules fail closed: with any region rule in force, a title asked for with no
    /// region is refused, unless the deployment chose to allow it.
    #[test]
    fn a_restricted_title_needs_a_region() {
        assert_eq!(
            ask("bob", "us-only", None),
            Entitlement::Denied(Denial::RegionRequired)
        );
        // The global deny list restricts every title.
        assert_eq!(
            ask("bob", "t", None),
            Entitlement::Denied(Denial::RegionRequired)
        );
        let open = StaticPolicy::open(2).unwrap();
        let user = UserId::parse("u", "bob").unwrap();
        let content = ContentId::parse("c", "t").unwrap();
        let query = EntitlementQuery {
            user: &user,
            profile: None,
            content: Some(&content),
            region: None,
            device: None,
            deadline: Default::default(),
        };
        assert_eq!(
            open.decide(query),
            Entitlement::Allowed(Grant::seats(2)),
            "no region rule: no region needed"
        );
        let lenient = policy().with_missing_region(MissingRegion::Allow);
        let content = ContentId::parse("c", "us-only").unwrap();
        assert_eq!(
            lenient.decide(EntitlementQuery {
                content: Some(&content),
                ..query
            }),
            Entitlement::Allowed(Grant::seats(2))
        );
        // Seats-only questions name no title and need no region.
        assert_eq!(
            policy().decide(EntitlementQuery {
                content: None,
                ..query
            }),
            Entitlement::Allowed(Grant::seats(2))
        );
    }

    #[test]
    fn content_and_regions_are_enforced() {
        assert_eq!(
            ask("bob", "withdrawn", None),
            Entitlement::Denied(Denial::Content)
        );
        assert_eq!(
            ask("bob", "t", Some("KP")),
            Entitlement::Denied(Denial::Geo)
        );
        assert_eq!(
            ask("bob", "us-only", Some("DE")),
            Entitlement::Denied(Denial::Geo)
        );
        assert_eq!(
            ask("bob", "us-only", Some("US")),
            Entitlement::Allowed(Grant::seats(2))
        );
    }

    #[test]
    fn plans_carry_device_rules() {
        let file: PolicyFile = toml::from_str(
            r#"
            [plans.mobile]
            seat_limit = 1
            devices = { allowed_types = ["mobile"], max_resolution = { default = 540 }, drm = { systems = ["widevine"], min_security_level = "L1" } }
            [users]
            mo = "mobile"
            "#,
        )
        .unwrap();
        let policy = StaticPolicy::from_file(file, None).unwrap();
        let user = UserId::parse("u", "mo").unwrap();
        let ask = |device| {
            policy.decide(EntitlementQuery {
                device: Some(device),
                ..EntitlementQuery::seats(&user, Default::default())
            })
        };
        assert_eq!(
            ask(DeviceType::Tv),
            Entitlement::Denied(Denial::DeviceNotAllowed)
        );
        let Entitlement::Allowed(grant) = ask(DeviceType::Mobile) else {
            panic!("a phone plays");
        };
        assert_eq!(grant.rules.max_resolution, Some(540));
        let drm = grant.rules.drm.unwrap();
        assert_eq!(drm.systems, [crate::model::DrmSystem::Widevine]);
        assert_eq!(drm.level, Some(crate::model::SecurityLevel::L1));
        // A seats-only question names no device: the seats are the plan's.
        assert_eq!(
            policy.decide(EntitlementQuery::seats(&user, Default::default())),
            Entitlement::Allowed(Grant::seats(1))
        );
        let typo: PolicyFile =
            toml::from_str("[plans.p]\nseat_limit = 1\ndevices = { allowed_types = [\"telly\"] }")
                .unwrap();
        let refused = StaticPolicy::from_file(typo, None).unwrap_err().to_string();
        assert!(
            refused.contains("plans.p.devices.allowed_types"),
            "{refused}"
        );
    }

    #[test]
    fn the_example_file_loads() {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/entitlements.example.toml"
        );
        StaticPolicy::load(Path::new(example), None).unwrap();
    }

    #[test]
    fn bad_files_are_refused_with_the_place() {
        let unknown_plan: PolicyFile = toml::from_str("[users]\nx = \"gold\"").unwrap();
        assert!(
            StaticPolicy::from_file(unknown_plan, None)
                .unwrap_err()
                .to_string()
                .contains("users.x")
        );
        let bad_region: PolicyFile = toml::from_str("[regions]\ndeny = [\"usa\"]").unwrap();
        assert!(
            StaticPolicy::from_file(bad_region, None)
                .unwrap_err()
                .to_string()
                .contains("regions.deny")
        );
        assert!(StaticPolicy::open(MAX_SEAT_LIMIT + 1).is_err());
        assert!(toml::from_str::<PolicyFile>("surprise = 1").is_err());
    }
}
