use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use server::app::{AppState, ModelCard, ServingModel};
use server::backend::builtin::Builtin;
use server::backend::retrieval;
use server::cli::{Cli, Command, Dtype, EvalArgs, ServeArgs};
use server::firehose::Firehose;
use server::metrics::Metrics;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            let doc = server::http::openapi()
                .to_pretty_json()
                .expect("the OpenAPI document serialises");
            println!("{doc}");
            ExitCode::SUCCESS
        }
        Command::Eval(args) => run("warn", eval(*args), |err| {
            eprintln!("tga-serve eval failed: {err}")
        }),
        Command::Serve(args) => run(
            "info",
            serve(*args),
            |err| tracing::error!(error = %err, "tga-serve failed"),
        ),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sets up logging (`RUST_LOG`, else `default_level`) and the async runtime, then runs `task`.
fn run(
    default_level: &str,
    task: impl std::future::Future<Output = Result<(), BoxError>>,
    report: impl FnOnce(BoxError),
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        // Colour codes only on a terminal: logs piped to files stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(err);
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let metrics = Arc::new(Metrics::new());
    let firehose = Arc::new(Firehose::default());
    let state = AppState::new(args.http_config(), metrics.clone(), firehose.clone());
    let listener = tokio::net::TcpListener::bind(args.address()).await?;
    tracing::info!(address = %listener.local_addr()?, "listening (/ready answers 503 until the model is loaded)");

    // Loading runs beside the server, so /health answers and /ready says 503 meanwhile.
    let (failed_tx, failed) = tokio::sync::oneshot::channel::<String>();
    let loader_state = state.clone();
    let grace = args.shutdown_grace();
    tokio::task::spawn_blocking(move || match load_model(&args, metrics, firehose) {
        Ok(model) => loader_state.set_model(model),
        Err(err) => {
            let _ = failed_tx.send(err.to_string());
        }
    });
    let (load_error_tx, load_error) = tokio::sync::oneshot::channel::<String>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            Ok(err) = failed => {
                tracing::error!(error = %err, "loading the model failed");
                let _ = load_error_tx.send(err);
            }
        }
    };
    server::http::serve(listener, state, shutdown, grace).await?;
    match load_error.await {
        Ok(err) => Err(format!("loading the model failed: {err}").into()),
        Err(_) => Ok(()),
    }
}

/// `tga-serve eval`: loads the model as `serve` does and runs the evaluation in process; Ctrl-C
/// stops it and the report covers what finished.
async fn eval(args: EvalArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = args.eval_config();
    let serve = args.serve.clone();
    let cancel = async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: writing the report of the finished runs");
        } else {
            std::future::pending::<()>().await;
        }
    };
    let report = match &args.url {
        Some(url) => {
            let remote = server::eval::Remote::connect(url, args.url_api_key.clone()).await?;
            server::eval::run(&server::eval::Target::Remote(remote), &config, cancel).await?
        }
        None => {
            let metrics = Arc::new(Metrics::new());
            let firehose = Arc::new(Firehose::default());
            let model = tokio::task::spawn_blocking(move || load_model(&serve, metrics, firehose))
                .await??;
            let report =
                server::eval::run(&server::eval::Target::InProcess(&model), &config, cancel)
                    .await?;
            model.engine.shutdown(std::time::Duration::ZERO);
            model.engine.stopped().await;
            report
        }
    };
    for (run, summary) in &report.runs {
        println!(
            "{run:>14}: DSR {} over {} runs",
            summary
                .dsr
                .dsr
                .map_or("–".to_string(), |d| format!("{:.1} %", 100.0 * d)),
            summary.runs
        );
    }
    println!(
        "wrote {0}/report.json, {0}/report.md and {0}/records.jsonl",
        config.out.display()
    );
    Ok(())
}

/// Loads the checkpoint (or the built-in tiny model), warms it up and starts its engine.
fn load_model(
    args: &ServeArgs,
    metrics: Arc<Metrics>,
    firehose: Arc<Firehose>,
) -> Result<ServingModel, Box<dyn std::error::Error + Send + Sync>> {
    let device = args.device.open()?;
    let random = args
        .random_weights
        .as_deref()
        .map(model::random::RandomModelSpec::parse)
        .transpose()?;
    let builtin = match args.model.as_deref().and_then(|m| m.to_str()) {
        _ if random.is_some() => None,
        None if args.model.is_none() => Some(Builtin::DEFAULT),
        None => None,
        Some(name) => Builtin::parse(name).transpose()?,
    };
    let materialized = builtin.map(Builtin::materialize).transpose()?;
    let dir = match (&materialized, &args.model) {
        (Some(m), _) => m.dir.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => PathBuf::new(), // --random-weights: no directory
    };
    if let Some(b) = builtin {
        tracing::info!(
            model = %b.id(),
            "serving the built-in model builtin:{}{}",
            b.name(),
            if b == Builtin::Tiny { " (random weights: its answers are noise)" } else { " (toy-scale, trained by tools/toy_tga)" }
        );
    }
    let vision_tower = args
        .vision_tower
        .clone()
        .or_else(|| materialized.as_ref().and_then(|m| m.vision_tower.clone()));
    let template = args
        .template
        .as_deref()
        .or_else(|| builtin.and_then(Builtin::template));
    let resolved_dtype = args.dtype.resolve(&device);
    let dtype = match resolved_dtype {
        Dtype::Bf16 => candle_core::DType::BF16,
        Dtype::F32 | Dtype::Auto => candle_core::DType::F32,
    };
    if dtype == candle_core::DType::BF16 && device.is_cpu() {
        tracing::warn!("bf16 on CPU is slow in candle (weights are widened on every matmul); f32 is recommended");
    }
    let started = std::time::Instant::now();
    let mut loaded = match &random {
        Some(spec) => server::backend::llava::load_random(
            spec,
            args.random_seed,
            Some(dtype),
            args.weights.linear_weights(),
            template,
            &device,
        )?,
        None => server::backend::llava::load(
            &dir,
            vision_tower.clone(),
            Some(dtype),
            args.weights.linear_weights(),
            template,
            &device,
        )?,
    };
    let max_model_len = args.max_model_len.map_or(
        loaded.model.config().text.max_position_embeddings,
        |limit| limit.min(loaded.model.config().text.max_position_embeddings),
    );
    let kv = server::kv_budget::plan(
        &loaded.model.config().text,
        dtype,
        &device,
        &server::kv_budget::KvBudgetArgs {
            kv_cache_memory: args.kv_cache_memory,
            gpu_memory_utilization: args.gpu_memory_utilization,
            block_size: args.block_size as usize,
            max_num_seqs: args.max_num_seqs as usize,
            max_model_len,
            max_batch_tokens: args.max_batch_tokens() as usize,
        },
    )?;
    std::sync::Arc::get_mut(&mut loaded.model)
        .ok_or("the model is shared before its KV cache is sized")?
        .configure_kv_pool(kv.pool)?;
    let capacity = kv.pool.capacity_tokens();
    tracing::info!(
        blocks = kv.pool.num_blocks,
        block_size = kv.pool.block_size,
        tokens = capacity,
        bytes = kv.bytes(),
        mib = format!("{:.1}", kv.bytes() as f64 / (1u64 << 20) as f64),
        longest_sequence = capacity.min(max_model_len),
        source = ?kv.source,
        "KV cache"
    );
    if capacity < max_model_len {
        tracing::warn!(
            kv_tokens = capacity,
            max_model_len,
            "the KV cache holds fewer tokens than the context length: longer requests are refused"
        );
    }
    let cfg = loaded.model.config();
    let card = ModelCard {
        id: args.served_model_name.clone().unwrap_or_else(|| {
            if let Some(spec) = &random {
                format!("random:{}", spec.name)
            } else if let Some(b) = builtin {
                b.id().to_string()
            } else {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string())
            }
        }),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        owned_by: "tga-serve".into(),
        max_model_len: cfg.text.max_position_embeddings,
        supports_images: true,
        builtin: builtin.is_some(),
        arch: match cfg.format {
            model::config::CheckpointFormat::HfLlava => "llava",
            model::config::CheckpointFormat::HfLlavaNext => "llava_next",
            model::config::CheckpointFormat::Original => "llava_mistral",
        }
        .into(),
        dtype: resolved_dtype.as_str().into(),
        device: args.device.to_string(),
    };
    let limits = model::image::ImageLimits {
        max_bytes: args.max_image_bytes,
        ..Default::default()
    };
    let mut processor = server::backend::llava::LlavaProcessor::new(&loaded, limits);
    let corpus = match (&args.retrieval_corpus, &materialized, builtin) {
        (Some(path), _, _) => Some(path.clone()),
        (None, Some(m), Some(b)) if b.retrieval() => Some(retrieval::write_corpus(
            &m.dir,
            server::backend::builtin::CORPUS,
        )?),
        _ => None,
    };
    if let Some(corpus) = corpus {
        let clip = args
            .retrieval_clip
            .clone()
            .or_else(|| vision_tower.clone())
            .ok_or("--retrieval-corpus needs a CLIP: pass --retrieval-clip DIR (a CLIPModel with both towers)")?;
        let config = retrieval::RetrievalConfig {
            corpus,
            index: args.retrieval_index.clone(),
            clip,
        };
        let retriever =
            retrieval::Retriever::load(&config, &loaded.model.preprocess_config().aspect)?;
        processor = processor.with_retriever(Arc::new(retriever));
    }
    if let Some(m) = &materialized {
        // Everything is loaded (the weights stay mapped), so the unpacked copy can go.
        if let Err(err) = m.remove() {
            tracing::debug!(error = %err, dir = %dir.display(), "cannot remove the built-in model's temp dir");
        }
    }
    let processor = Arc::new(processor);
    let mut backend = server::backend::llava::LlavaBackend::new(&loaded);
    backend.warm_up(args.max_num_seqs as usize)?;
    // Loading and the warm-up ran on this thread; the engine thread takes over the model now.
    // On CUDA each host thread has its own stream: wait for this one's work before handing over.
    device.synchronize()?;
    tracing::info!(
        model = %card.id,
        device = %args.device,
        layers = cfg.text.num_hidden_layers,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded and warmed up"
    );
    Ok(ServingModel::start(
        backend,
        processor,
        card,
        &args.serving_config(),
        metrics,
        firehose,
    )?)
}

/// SIGTERM (what orchestrators send) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}
