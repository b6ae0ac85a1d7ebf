# Device runs behind benchmarks/README.md (bash benchmarks/run_gpu.sh MODE on the GPU host).
# .whl/ (git-ignored, carried): wheels the host lacks, for its Python 3.12: h5netcdf, arviz-base and
# arviz-stats 0.x (pyproject.toml pins < 1), xarray-einstats, flatbuffers; e.g. pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl h5netcdf "arviz-base<1" "arviz-stats<1" ...
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks || exit
nvidia-smi --query-gpu=name --format=csv,noheader
export XDG_CACHE_HOME=/tmp/xdgx
case "$1" in
main)  # main job, one GPU, cold then warm cache; PyTorch side by side
  export CUDA_VISIBLE_DEVICES=0
  python3 benchmarks/profile_main_job.py 2>$OUT/pcold.err | tee $OUT/cold.json
  python3 benchmarks/profile_main_job.py 2>$OUT/pwarm.err | tee $OUT/warm.json
  timeout 330 python3 benchmarks/bench_pytorch.py --models 1 16 64 256 1024 --iterations 200 2>$OUT/torch.err | tee $OUT/torch.json ;;
scaling)  # strong scaling of a 1024-model grid and of the main job over 1, 2, 4 GPUs
  for d in 0 0,1 0,1,2,3; do
    CUDA_VISIBLE_DEVICES=$d python3 benchmarks/bench_scaling.py --models 1024 --iterations 1000 2>>$OUT/scaling.err | tee -a $OUT/scaling.json
  done
  CUDA_VISIBLE_DEVICES=0,1,2,3 python3 benchmarks/profile_main_job.py 2>$OUT/p4.err | tee $OUT/main4.json
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_pytorch.py --models 64 256 --iterations 200 --variants torch-vmap torch-compile 2>$OUT/torch.err | tee $OUT/torch.json ;;
job)  # the main job only, one GPU, cold then warm cache (the README's GPU figure); NUTS per device
  export CUDA_VISIBLE_DEVICES=0
  python3 benchmarks/profile_main_job.py 2>$OUT/pcold.err | tee $OUT/cold.json
  python3 benchmarks/profile_main_job.py 2>$OUT/pwarm.err | tee $OUT/warm.json
  timeout 200 python3 benchmarks/bench_error_models.py --devices cpu gpu 2>$OUT/em.err | tee $OUT/em.json ;;
h100)  # the Done-when pair on an H100: PyTorch at 64 and 256 models, then the main job cold
  timeout 170 python3 benchmarks/bench_pytorch.py --models 64 256 --iterations 200 --variants torch-vmap torch-compile 2>$OUT/torch.err | tee $OUT/torch.json
  python3 benchmarks/profile_main_job.py 2>$OUT/pcold.err | tee $OUT/cold.json ;;
objectives)  # cost per iteration of every objective, 1 and 256 models, one GPU
  export CUDA_VISIBLE_DEVICES=0
  python3 benchmarks/bench_objectives.py --models 1 --iterations 2000 --json $OUT/obj1.json 2>$OUT/obj1.err | tee $OUT/obj1.txt
  python3 benchmarks/bench_objectives.py --models 256 --iterations 2000 --json $OUT/obj256.json 2>$OUT/obj256.err | tee $OUT/obj256.txt ;;
precision)  # the main job cold then warm; PyTorch and fit_grid at matched precision (both settings)
  export CUDA_VISIBLE_DEVICES=0
  python3 benchmarks/profile_main_job.py 2>$OUT/pcold.err | tee $OUT/cold.json
  python3 benchmarks/profile_main_job.py 2>$OUT/pwarm.err | tee $OUT/warm.json
  timeout 300 python3 benchmarks/bench_pytorch.py --models 64 256 --iterations 200 --variants torch-vmap torch-compile --precision float32 tf32 2>$OUT/torch.err | tee $OUT/torch.json
  timeout 120 python3 benchmarks/bench_training.py --models 64 256 --iterations 2000 --precision default float32 tf32 2>$OUT/train.err | tee $OUT/train.json ;;
digits)  # issue 27: the digits rebuilt from their spec by this host's scikit-learn; analysis/digits.py --full, the learned part
  export CUDA_VISIBLE_DEVICES=0
  python3 -c "import sklearn, jax; jax.config.update('jax_enable_x64', True); import mcm_prob as mp; d = mp.data.from_spec({'dataset': 'digits', 'kind': 'gaussian', 'sha256': '20def7f70a702f0af9732fbba4375e147a7d54fe70d8c45569b8e7c1c7010c10'}); print('scikit-learn', sklearn.__version__, 'digits rebuilt, hash checked:', d.dim, d.regime)" 2>&1 | tee $OUT/rebuild.txt
  cd analysis && timeout 500 python3 -c "import digits; digits.objectives(['--full'])" > $OUT/digits.log 2>$OUT/digits.err; tail -40 $OUT/digits.log; cp digits_* $OUT/ ;;
scaling-runs)  # issue 28 on a multi-GPU kind: benchmarks/scaling_runs.py with the arguments after the mode, e.g.
  # strong --models 4096 --devices 1 2 4 8 | weak --per-device 256 --devices 1 2 4 8 | study --config analysis/gpu_estimation.toml --devices 4
  shift; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
  python3 -c "import jax; print('jax', jax.__version__, jax.device_count(), 'devices')"
  timeout 570 python3 benchmarks/scaling_runs.py "$@" --out /tmp/scaling_study 2>$OUT/runs.err | tee $OUT/runs.jsonl ;;  # study files stay on the (warm) machine: too large to return
esac
# analysis/objectives.py small default on one GPU (both paths): files under $OUT
if [ "$1" = analysis ]; then
  export CUDA_VISIBLE_DEVICES=0
  cd analysis && python3 objectives.py > $OUT/objectives.log 2>$OUT/objectives.err
  cp objectives_*.nc objectives_*_report.txt objectives_*.png $OUT/ 2>/dev/null; tail -5 $OUT/objectives.log
fi
