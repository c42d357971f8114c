//! The same REAPI scenario against every real server `scripts/reapi-servers.sh` runs.
//!
//! These use the raw `reapi` stubs (generated from our own .proto files), so they prove that our
//! bindings' wire format, digests and resource names interoperate with independent server
//! implementations before any recache layer sits on top. Each scenario uses fresh random content, so reruns against a warm server still
//! exercise the "missing" paths.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures::StreamExt;
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient, digest_function,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use testutil::real_servers::{RealServer, ServerKind};

/// Fresh, incompressible content: every run's blobs are new to the server.
fn unique_blob(len: usize) -> Vec<u8> {
    testutil::data::unique(len)
}

async fn capabilities(server: &RealServer) {
    let caps = CapabilitiesClient::new(server.channel.clone())
        .get_capabilities(remexec::GetCapabilitiesRequest {
            instance_name: server.instance.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps
        .cache_capabilities
        .expect("a cache server must advertise cache_capabilities");
    assert!(
        cache
            .digest_functions
            .contains(&(digest_function::Value::Sha256 as i32)),
        "{} does not advertise SHA-256: {:?}",
        server.kind.name(),
        cache.digest_functions
    );
    eprintln!(
        "{}: max_batch_total_size_bytes={} compressors={:?}",
        server.kind.name(),
        cache.max_batch_total_size_bytes,
        cache.supported_compressors
    );
}

async fn find_missing_blobs(server: &RealServer) {
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let present = unique_blob(100);
    let absent = unique_blob(200);
    let present_d = Digest::of_bytes(&present);
    let absent_d = Digest::of_bytes(&absent);
    let upload = cas
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            instance_name: server.instance.clone(),
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(present_d.into()),
                data: present,
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upload.responses[0].status.as_ref().map_or(0, |s| s.code), 0);

    let missing = cas
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            instance_name: server.instance.clone(),
            blob_digests: vec![present_d.into(), absent_d.into()],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let missing: Vec<Digest> = missing
        .missing_blob_digests
        .iter()
        .map(|d| Digest::try_from(d).unwrap())
        .collect();
    assert_eq!(missing, vec![absent_d]);
}

async fn batch_update_then_read(server: &RealServer) {
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let blobs: Vec<Vec<u8>> = vec![unique_blob(1), unique_blob(4096), unique_blob(300_000)];
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of_bytes(b)).collect();
    let resp = cas
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            instance_name: server.instance.clone(),
            requests: blobs
                .iter()
                .zip(&digests)
                .map(|(b, d)| remexec::batch_update_blobs_request::Request {
                    digest: Some((*d).into()),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), 3);
    for r in &resp.responses {
        assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0, "{r:?}");
    }

    // Ask in reverse order: responses must be matched by digest, not position.
    let read = cas
        .batch_read_blobs(remexec::BatchReadBlobsRequest {
            instance_name: server.instance.clone(),
            digests: digests.iter().rev().map(|d| (*d).into()).collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses.len(), 3);
    for r in read.responses {
        assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0);
        let d = Digest::try_from(r.digest.as_ref().unwrap()).unwrap();
        let i = digests.iter().position(|x| *x == d).unwrap();
        assert_eq!(Digest::of_bytes(&r.data), d, "content verifies");
        assert_eq!(&r.data[..], &blobs[i][..]);
    }
}

async fn bytestream_write_then_read_10mib(server: &RealServer) {
    const CHUNK: usize = 1024 * 1024; // well under the 4 MiB gRPC message cap
    let blob = unique_blob(10 * 1024 * 1024);
    let digest = Digest::of_bytes(&blob);
    let resource = server.write_resource(&uuid::Uuid::new_v4().to_string(), &digest);

    let requests: Vec<WriteRequest> = blob
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            // Only the first message needs the resource name.
            resource_name: if i == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (i * CHUNK) as i64,
            finish_write: (i + 1) * CHUNK >= blob.len(),
            data: chunk.to_vec(),
        })
        .collect();
    let mut bs = ByteStreamClient::new(server.channel.clone());
    let written = bs
        .write(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.committed_size, blob.len() as i64);

    let mut stream = bs
        .read(ReadRequest {
            resource_name: server.read_resource(&digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut hasher = hashing::Hasher::new();
    let mut max_chunk = 0;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        max_chunk = max_chunk.max(msg.data.len());
        hasher.update(&msg.data);
    }
    assert_eq!(hasher.finish(), digest, "read back what was written");
    assert!(max_chunk <= 4 * 1024 * 1024, "chunk of {max_chunk} bytes");
}

async fn action_cache_update_then_get(server: &RealServer) {
    // Output blobs must exist in the CAS: some servers (BuildGrid) drop entries whose outputs
    // are gone.
    let stdout = unique_blob(64);
    let output = unique_blob(5000);
    let stdout_d = Digest::of_bytes(&stdout);
    let output_d = Digest::of_bytes(&output);
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    cas.batch_update_blobs(remexec::BatchUpdateBlobsRequest {
        instance_name: server.instance.clone(),
        requests: [(&stdout, stdout_d), (&output, output_d)]
            .into_iter()
            .map(|(b, d)| remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: b.clone(),
                compressor: 0,
            })
            .collect(),
        digest_function: 0,
    })
    .await
    .unwrap();

    // The action itself goes into the CAS too, as a real client would upload it.
    let command = remexec::Command {
        arguments: vec!["/bin/echo".into(), uuid::Uuid::new_v4().to_string()],
        ..Default::default()
    };
    let command_bytes = prost::Message::encode_to_vec(&command);
    let action = remexec::Action {
        command_digest: Some(Digest::of_bytes(&command_bytes).into()),
        input_root_digest: Some(hashing::EMPTY_DIGEST.into()),
        ..Default::default()
    };
    let action_digest = Digest::of_bytes(&prost::Message::encode_to_vec(&action));

    let result = remexec::ActionResult {
        output_files: vec![remexec::OutputFile {
            path: "out/result.bin".into(),
            digest: Some(output_d.into()),
            is_executable: true,
            ..Default::default()
        }],
        exit_code: 0,
        stdout_digest: Some(stdout_d.into()),
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(server.channel.clone());
    ac.update_action_result(remexec::UpdateActionResultRequest {
        instance_name: server.instance.clone(),
        action_digest: Some(action_digest.into()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();

    let got = ac
        .get_action_result(remexec::GetActionResultRequest {
            instance_name: server.instance.clone(),
            action_digest: Some(action_digest.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.exit_code, 0);
    assert_eq!(got.output_files.len(), 1);
    assert_eq!(got.output_files[0].path, "out/result.bin");
    assert!(got.output_files[0].is_executable);
    assert_eq!(
        Digest::try_from(got.output_files[0].digest.as_ref().unwrap()).unwrap(),
        output_d
    );
    assert_eq!(
        Digest::try_from(got.stdout_digest.as_ref().unwrap()).unwrap(),
        stdout_d
    );

    // An action nobody stored is a plain NOT_FOUND, which the cache layer treats as a miss.
    let unknown = Digest::of_bytes(&unique_blob(32));
    let err = ac
        .get_action_result(remexec::GetActionResultRequest {
            instance_name: server.instance.clone(),
            action_digest: Some(unknown.into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

macro_rules! interop_suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn get_capabilities() {
                if let Some(s) = RealServer::require($kind).await {
                    capabilities(&s).await
                }
            }

            #[tokio::test]
            async fn find_missing_blobs_reports_only_absent() {
                if let Some(s) = RealServer::require($kind).await {
                    find_missing_blobs(&s).await
                }
            }

            #[tokio::test]
            async fn batch_update_then_batch_read() {
                if let Some(s) = RealServer::require($kind).await {
                    batch_update_then_read(&s).await
                }
            }

            #[tokio::test]
            async fn bytestream_write_then_read_10_mib() {
                if let Some(s) = RealServer::require($kind).await {
                    bytestream_write_then_read_10mib(&s).await
                }
            }

            #[tokio::test]
            async fn update_then_get_action_result() {
                if let Some(s) = RealServer::require($kind).await {
                    action_cache_update_then_get(&s).await
                }
            }
        }
    };
}

interop_suite!(buildgrid, ServerKind::BuildGrid);
interop_suite!(buildbox_casd, ServerKind::BuildboxCasd);
interop_suite!(recache_serve, ServerKind::Recache);
interop_suite!(casd_proxy, ServerKind::CasdProxy);

/// buildbox-casd as a real *client* of `recache serve`: a blob and an action result written
/// through the proxy land in our server, and our server serves them back directly.
#[tokio::test]
async fn writes_through_the_casd_proxy_land_in_recache_serve() {
    let Some(proxy) = RealServer::require(ServerKind::CasdProxy).await else {
        return;
    };
    let Some(origin) = RealServer::require(ServerKind::Recache).await else {
        return;
    };
    let blob = unique_blob(300_000);
    let d = Digest::of_bytes(&blob);
    let resp = ContentAddressableStorageClient::new(proxy.channel.clone())
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            instance_name: proxy.instance.clone(),
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: blob.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().map_or(0, |s| s.code), 0);
    let action = Digest::of_bytes(&unique_blob(64));
    let result = remexec::ActionResult {
        output_files: vec![remexec::OutputFile {
            path: "out.bin".into(),
            digest: Some(d.into()),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    ActionCacheClient::new(proxy.channel.clone())
        .update_action_result(remexec::UpdateActionResultRequest {
            instance_name: proxy.instance.clone(),
            action_digest: Some(action.into()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    // Straight from recache serve, not through the proxy.
    let missing = ContentAddressableStorageClient::new(origin.channel.clone())
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            instance_name: origin.instance.clone(),
            blob_digests: vec![d.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        missing.missing_blob_digests.is_empty(),
        "the blob written through casd is in recache serve"
    );
    let got = ActionCacheClient::new(origin.channel.clone())
        .get_action_result(remexec::GetActionResultRequest {
            instance_name: origin.instance.clone(),
            action_digest: Some(action.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.output_files, result.output_files);
    let mut stream = ByteStreamClient::new(origin.channel.clone())
        .read(ReadRequest {
            resource_name: origin.read_resource(&d),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(m) = stream.next().await {
        back.extend_from_slice(&m.unwrap().data);
    }
    assert_eq!(back, blob);
}
