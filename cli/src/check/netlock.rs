//! The network lock, for real: a loopback TCP connection is locked, a byte
//! sent on it must not arrive, and must arrive (sent again by TCP) once
//! the lock is removed.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use cr_ebpf_common::netlock::{mapped_v4, NetLockKey};
use cr_ebpf_loader::netlock;

use super::Check;

pub fn check() -> Check {
    Check::new(
        "eBPF",
        "network lock (tcx classifier pinned in bpffs)",
        false,
        probe(),
    )
}

/// An I/O error as a message naming what failed.
fn e(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |err| format!("{what}: {err}")
}

fn probe() -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(e("a loopback listener"))?;
    let mut client = TcpStream::connect(listener.local_addr().map_err(e("its address"))?)
        .map_err(e("connecting on loopback"))?;
    let (mut server, _) = listener.accept().map_err(e("accepting"))?;
    let port = |a: std::net::SocketAddr| a.port().to_be();
    let key = NetLockKey {
        local: mapped_v4([127, 0, 0, 1]),
        remote: mapped_v4([127, 0, 0, 1]),
        local_port: port(server.local_addr().map_err(e("address"))?),
        remote_port: port(server.peer_addr().map_err(e("address"))?),
    };
    let name = format!("check-{}", std::process::id());
    let locked = netlock::lock(&name, &[key]).map_err(|err| crate::error_chain(&err))?;
    let outcome = (|| {
        client.write_all(b"x").map_err(e("sending"))?;
        let mut b = [0u8; 1];
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .map_err(e("SO_RCVTIMEO"))?;
        if server.read(&mut b).is_ok() {
            return Err("a byte of a locked connection arrived".to_string());
        }
        Ok(())
    })();
    let removed = netlock::unlock(&name).map_err(|err| crate::error_chain(&err))?;
    outcome?;
    if !removed {
        return Err("the lock's directory was gone before it was removed".into());
    }
    let start = Instant::now();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(e("SO_RCVTIMEO"))?;
    let mut b = [0u8; 1];
    server
        .read_exact(&mut b)
        .map_err(e("the byte after the lock was removed"))?;
    Ok(format!(
        "a locked loopback connection lost nothing: its byte came {:.0} ms after the lock \
         on {} interface(s) was removed",
        start.elapsed().as_secs_f64() * 1e3,
        locked.interfaces.len()
    ))
}
