//! Names people know for a cgroup: the systemd unit it belongs to and the container it is.
//!
//! Both are read from the cgroup's path, as systemd and the container runtimes lay it out:
//! - systemd: each unit is a directory named after it (`payments.service`, `session-3.scope`,
//!   `user.slice`); the unit of a cgroup is the deepest such component. Names are kept as
//!   systemd spells them, escapes included (`dev-disk-by\x2duuid.mount`): that is the name
//!   `systemctl` takes.
//! - containers: a 64-hex-digit id, as the scope `docker-ID.scope`, `cri-containerd-ID.scope`,
//!   `crio-ID.scope`, `libpod-ID.scope` (systemd cgroup driver), or as a bare directory
//!   `ID` under `docker/`, `kubepods/…/pod…/` and the like (cgroupfs driver). Inside a cgroup
//!   namespace paths are relative, which changes nothing here: only components are read.

/// Unit types whose directories systemd creates in the cgroup tree.
const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".slice", ".socket", ".mount", ".swap"];

/// The deepest systemd unit in `path`, if any.
pub fn unit_of(path: &str) -> Option<&str> {
    path.rsplit('/').find(|component| {
        UNIT_SUFFIXES
            .iter()
            .any(|suffix| component.len() > suffix.len() && component.ends_with(suffix))
    })
}

/// The container id in `path`, if it names one: the deepest component that is, or holds
/// as a runtime's scope, a 64-hex-digit id.
pub fn container_of(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|component| {
        let id = component
            .strip_suffix(".scope")
            .and_then(|scope| scope.rsplit_once('-'))
            .map_or(component, |(_, id)| id);
        is_container_id(id).then_some(id)
    })
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";

    #[test]
    fn systemd_units_are_the_deepest_unit_component() {
        assert_eq!(
            unit_of("/system.slice/payments.service"),
            Some("payments.service")
        );
        assert_eq!(
            unit_of(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-123.scope"
            ),
            Some("app-firefox-123.scope")
        );
        assert_eq!(unit_of("/system.slice"), Some("system.slice"));
        assert_eq!(
            unit_of(
                "/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service"
            ),
            Some("systemd-fsck@dev-disk-by\\x2duuid-1.service")
        );
        assert_eq!(unit_of("/"), None);
        assert_eq!(unit_of("/docker/abc"), None);
    }

    #[test]
    fn containers_of_every_runtime_and_driver_are_found() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod12.slice/crio-{ID}.scope"),
            format!("/kubepods/besteffort/pod1234-5678/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
        ] {
            assert_eq!(container_of(&path), Some(ID), "{path}");
        }
        assert_eq!(container_of("/system.slice/payments.service"), None);
        assert_eq!(container_of("/system.slice/docker-short.scope"), None);
        assert_eq!(
            unit_of(&format!("/system.slice/docker-{ID}.scope")),
            Some(&*format!("docker-{ID}.scope"))
        );
    }
}
