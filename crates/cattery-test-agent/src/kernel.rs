//! What a process can leave in the kernel rather than in files: a System V shared memory
//! segment, a POSIX message queue and keys in its uid's keyrings. Isolation tests have one
//! instance leave each (`POST /control/leave-kernel`) and the next instance of the same uid
//! look for them (`POST /control/find-kernel`): none may be found.

use std::ffi::CString;

/// The System V key of `tag`.
fn shm_key(tag: &str) -> libc::key_t {
    let h = tag.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (h & 0x7fff_ffff) as libc::key_t
}

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// The keyrings a process may reach by a special id, with their names.
const RINGS: [(&str, i32); 3] = [
    ("session", libc::KEY_SPEC_SESSION_KEYRING),
    ("user", libc::KEY_SPEC_USER_KEYRING),
    ("userSession", libc::KEY_SPEC_USER_SESSION_KEYRING),
];

/// The uid's persistent keyring, or why not.
fn persistent() -> Result<i64, String> {
    // SAFETY: keyctl with integer arguments.
    let id = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_GET_PERSISTENT,
            -1i64,
            libc::KEY_SPEC_PROCESS_KEYRING as i64,
        )
    };
    if id < 0 {
        return Err(errno());
    }
    Ok(id)
}

fn description(tag: &str, ring: &str) -> CString {
    CString::new(format!("cattery-{tag}-{ring}")).unwrap_or_default()
}

/// Leaves a shared memory segment, a message queue and a key in each keyring, each holding
/// `secret-<tag>`; answers what was left (`true`) or why not.
pub fn leave(tag: &str) -> Vec<(String, Result<(), String>)> {
    let secret = format!("secret-{tag}");
    let mut out = Vec::new();
    // SAFETY: System V calls on a segment this process makes; the copy stays in its size.
    let shm = unsafe {
        let id = libc::shmget(shm_key(tag), 4096, libc::IPC_CREAT | 0o600);
        if id < 0 {
            Err(errno())
        } else {
            let at = libc::shmat(id, std::ptr::null(), 0);
            if at as isize == -1 {
                Err(errno())
            } else {
                std::ptr::copy_nonoverlapping(secret.as_ptr(), at.cast(), secret.len());
                libc::shmdt(at);
                Ok(())
            }
        }
    };
    out.push(("shm".into(), shm));
    let name = CString::new(format!("/cattery-{tag}")).unwrap_or_default();
    // SAFETY: mq_open with a NUL-terminated name and default attributes; mq_send from a
    // buffer of the given length.
    let mq = unsafe {
        let q = libc::mq_open(
            name.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o600 as libc::mode_t,
            std::ptr::null::<libc::mq_attr>(),
        );
        if q < 0 {
            Err(errno())
        } else {
            let r = libc::mq_send(q, secret.as_ptr().cast(), secret.len(), 0);
            libc::mq_close(q);
            if r == 0 {
                Ok(())
            } else {
                Err(errno())
            }
        }
    };
    out.push(("mqueue".into(), mq));
    let mut rings: Vec<(String, i64)> = RINGS
        .iter()
        .map(|(n, id)| (n.to_string(), i64::from(*id)))
        .collect();
    match persistent() {
        Ok(id) => rings.push(("persistent".into(), id)),
        Err(e) => out.push(("persistent".into(), Err(e))),
    }
    for (ring, id) in rings {
        let desc = description(tag, &ring);
        // SAFETY: add_key with NUL-terminated type and description and a sized payload.
        let k = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                desc.as_ptr(),
                secret.as_ptr(),
                secret.len(),
                id,
            )
        };
        out.push((ring, if k < 0 { Err(errno()) } else { Ok(()) }));
    }
    out
}

/// Looks for what [`leave`] left with `tag`: the names of what was found.
pub fn find(tag: &str) -> Vec<String> {
    let mut found = Vec::new();
    // SAFETY: shmget without IPC_CREAT only looks up.
    if unsafe { libc::shmget(shm_key(tag), 0, 0) } >= 0 {
        found.push("shm".to_string());
    }
    let name = CString::new(format!("/cattery-{tag}")).unwrap_or_default();
    // SAFETY: mq_open without O_CREAT only opens.
    let q = unsafe { libc::mq_open(name.as_ptr(), libc::O_RDONLY) };
    if q >= 0 {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::mq_close(q) };
        found.push("mqueue".to_string());
    }
    let mut rings: Vec<(String, i64)> = RINGS
        .iter()
        .map(|(n, id)| (n.to_string(), i64::from(*id)))
        .collect();
    if let Ok(id) = persistent() {
        rings.push(("persistent".into(), id));
    }
    for (ring, id) in rings {
        let desc = description(tag, &ring);
        // SAFETY: keyctl search with NUL-terminated type and description.
        let k = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_SEARCH,
                id,
                c"user".as_ptr(),
                desc.as_ptr(),
                0,
            )
        };
        if k >= 0 {
            found.push(ring);
        }
    }
    found
}
