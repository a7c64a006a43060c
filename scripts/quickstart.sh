#!/usr/bin/env bash
# The whole job on the embedded default, offline: a tiny random-weight SD teacher, shards of
# real photographs, a short distillation with checkpoints, a resume from the latest one,
# then a 2-step sample of the distilled pipeline. Everything goes to ./quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=${WORK:-quickstart}
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
TRAIN_FLAGS=(
  --pretrained_teacher_model="$WORK/tiny-sd"
  --output_dir="$WORK/splam-tiny"
  --train_shards_path_or_url="$WORK/shards/{00000..00003}.tar"
  --resolution=64 --train_batch_size=4 --dataloader_num_workers=2
  --learning_rate=8e-6 --loss_type=huber --ema_decay=0.95 --adam_weight_decay=0.0
  --gradient_checkpointing --checkpointing_steps=10 --checkpoints_total_limit=2
  --validation_steps=20 --validation_prompts "a cup of coffee on a saucer" "a rocket on a launch pad"
  --resume_from_checkpoint=latest --seed=453645634
)

rm -rf "$WORK"
"$PYTHON" scripts/make_tiny_teacher.py "$WORK/tiny-sd"
"$PYTHON" scripts/make_shards.py --output_dir "$WORK/shards" --num_shards 4 --samples_per_shard 32 --resolution 64

echo "== Distil for 20 steps, checkpointing every 10"
"${LAUNCH[@]}" train_splam_distill_sd_wds.py "${TRAIN_FLAGS[@]}" --max_train_steps=20
echo "== Resume from the latest checkpoint and go on to 30 steps"
"${LAUNCH[@]}" train_splam_distill_sd_wds.py "${TRAIN_FLAGS[@]}" --max_train_steps=30

echo "== Sample the distilled pipeline in 2 steps"
"$PYTHON" scripts/sample.py --model "$WORK/splam-tiny" --prompt "a cup of coffee on a saucer" --steps 2 --out "$WORK/sample.png"
ls "$WORK/splam-tiny"
