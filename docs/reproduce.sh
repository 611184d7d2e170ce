#!/usr/bin/env bash
# Re-runs every experiment behind docs/RESULTS.md, keeps each study's runs as one file in
# docs/studies/ and rewrites the reports in docs/results/. From the repository root, with the GLUE TSVs in
# ../shared/glue_data (or pass another folder as $1). About 11 hours on a 2-core CPU; finished
# runs are skipped, so it can be stopped and restarted. Run one block to answer one question.
set -euo pipefail
data=${1:-../shared/glue_data}
py=${PYTHON:-python}
c="--model=minilm --data_dir=$data --max_steps=300 --eval_every=100 --progress=false"

# 1. Methods x learning rate, SST-2 and STS-B (the lr study and the method comparison).
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=full;learning_rate=2e-5,5e-5,1e-4,2e-4" --seeds=0,1
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=full;learning_rate=4e-4"
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=lora;learning_rate=5e-4,1e-3,2e-3" --seeds=0,1
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=lora;learning_rate=2e-4,4e-3"
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=bitfit;learning_rate=1e-3,3e-3,1e-2" --seeds=0,1
$py -m experiments.sweep --root=runs/methods-sst2 --task=sst2 $c --grid="method=bitfit;learning_rate=5e-4,3e-2"
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=full;learning_rate=2e-5,5e-5,1e-4,2e-4"
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=lora;learning_rate=5e-4,1e-3,2e-3,4e-3,8e-3"
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=bitfit;learning_rate=1e-3,3e-3,1e-2,3e-2"
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=full;learning_rate=2e-4" --seeds=0,1
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=lora;learning_rate=4e-3" --seeds=0,1
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=bitfit;learning_rate=3e-3,1e-2" --seeds=0,1

# 2. Regression levers on STS-B: label map (--standardize_targets) x trainable pooler.
$py -m experiments.sweep --root=runs/labelmap-stsb --task=stsb $c --grid="method=lora;learning_rate=5e-4;standardize_targets=false"
$py -m experiments.sweep --root=runs/labelmap-stsb --task=stsb $c --grid="method=bitfit;learning_rate=1e-3;standardize_targets=false"
$py -m experiments.sweep --root=runs/labelmap-stsb --task=stsb $c --grid="method=lora;learning_rate=5e-4;standardize_targets=false,true;train_pooler=true"
$py -m experiments.sweep --root=runs/labelmap-stsb --task=stsb $c --grid="method=bitfit;learning_rate=1e-3;standardize_targets=false,true;train_pooler=true"
# ... and the pooler on SST-2.
$py -m experiments.sweep --root=runs/pooler-sst2 --task=sst2 $c --grid="method=lora;learning_rate=5e-4,1e-3;train_pooler=true"
$py -m experiments.sweep --root=runs/pooler-sst2 --task=sst2 $c --grid="method=bitfit;learning_rate=1e-3,1e-2;train_pooler=true"

# 3. LoRA rank on SST-2.
$py -m experiments.sweep --root=runs/rank-sst2 --task=sst2 $c --grid="method=lora;lora_rank=1,2,4,8,16,32,64" --learning_rate=5e-4
$py -m experiments.sweep --root=runs/rank-sst2 --task=sst2 $c --grid="method=lora;lora_rank=1,2,4,8,16,32,64;learning_rate=2e-3"

# 4. A longer budget on STS-B (3 epochs = 540 steps).
l="--model=minilm --data_dir=$data --num_epochs=3 --eval_every=180 --progress=false"
$py -m experiments.sweep --root=runs/long-stsb --task=stsb $l --grid="method=lora;learning_rate=4e-3"
$py -m experiments.sweep --root=runs/long-stsb --task=stsb $l --grid="method=bitfit;learning_rate=3e-3"

# 5. The PEFT family on SST-2, a first look (three learning rates per method, seed 1 at the best).
f() { $py -m experiments.sweep --root=runs/family-sst2 --task=sst2 $c "$@"; }
f --grid="method=dora;learning_rate=1e-3,2e-3,4e-3"
f --grid="method=ia3;learning_rate=3e-3,1e-2,3e-2"
f --grid="method=vera;learning_rate=4e-3,1e-2,3e-2"
f --grid="method=ln_tuning;learning_rate=1e-3,3e-3,1e-2"
f --grid="method=adapter_houlsby,adapter_pfeiffer;learning_rate=3e-4,1e-3,3e-3"
f --grid="method=lora;loraplus_lr_ratio=16;learning_rate=2.5e-4,5e-4,1e-3"
f --seeds=1 --grid="method=dora;learning_rate=4e-3"
f --seeds=1 --grid="method=ia3;learning_rate=3e-2"
f --seeds=1 --grid="method=vera;learning_rate=3e-2"
f --seeds=1 --grid="method=ln_tuning;learning_rate=1e-2"
f --seeds=1 --grid="method=adapter_houlsby;learning_rate=1e-3"
f --seeds=1 --grid="method=adapter_pfeiffer;learning_rate=3e-3"
f --seeds=1 --grid="method=lora;loraplus_lr_ratio=16;learning_rate=1e-3"

# 6. The family, continued: grids extended until each SST-2 peak is interior; prompt tuning;
#    every method on MRPC (three learning rates, one seed).
f --grid="method=dora;learning_rate=8e-3"
f --grid="method=ia3;learning_rate=1e-1"
f --grid="method=vera;learning_rate=1e-1"
f --grid="method=ln_tuning;learning_rate=3e-2"
f --grid="method=adapter_pfeiffer;learning_rate=1e-2"
f --grid="method=prompt;learning_rate=3e-3,1e-2,3e-2,1e-1"
f --seeds=1 --grid="method=prompt;learning_rate=3e-2"
f --grid="method=prompt;prompt_head=virtual;learning_rate=3e-2"
f --seeds=1 --grid="method=lora;loraplus_lr_ratio=16;learning_rate=5e-4"
m() { $py -m experiments.sweep --root=runs/family-mrpc --task=mrpc $c "$@"; }
m --grid="method=lora;learning_rate=1e-3,2e-3,4e-3"
m --grid="method=full;learning_rate=5e-5,1e-4"
m --grid="method=bitfit;learning_rate=3e-3,1e-2"
m --grid="method=dora;learning_rate=2e-3,4e-3,8e-3"
m --grid="method=ia3;learning_rate=1e-2,3e-2,1e-1"
m --grid="method=vera;learning_rate=1e-2,3e-2,1e-1"
m --grid="method=ln_tuning;learning_rate=3e-3,1e-2,3e-2"
m --grid="method=adapter_pfeiffer;learning_rate=1e-3,3e-3,1e-2"
m --grid="method=adapter_houlsby;learning_rate=3e-4,1e-3,3e-3"
m --grid="method=prompt;learning_rate=1e-2,3e-2,1e-1"
m --grid="method=lora;loraplus_lr_ratio=16;learning_rate=2.5e-4,5e-4,1e-3"

# 7. The GLUE suite on the six offline tasks: full, LoRA, BitFit at 200 steps x 32 per task,
#    each at its best SST-2 learning rate of block 1.
g() { $py -m experiments.run_glue_suite --model=minilm --data_dir=$data \
      --tasks=cola,sst2,mrpc,stsb,rte,wnli --max_steps=200 --eval_every=100 --progress=false "$@"; }
g --method=lora --learning_rate=2e-3 --output_dir=runs/glue-minilm-lora
g --method=bitfit --learning_rate=1e-2 --output_dir=runs/glue-minilm-bitfit
g --method=full --learning_rate=1e-4 --output_dir=runs/glue-minilm-full

# 8. The family, continued (run with the code of f8ba707, whose dropout masks were threefry
#    bits: later code hashes positions, same distribution, other draws): MRPC grids for BitFit, the adapters and LoRA+, second seeds at each MRPC
#    best point, prompt's second SST-2 seed and its peft-layout head.
m --grid="method=bitfit;learning_rate=1e-3,3e-3,1e-2"
m --grid="method=adapter_houlsby;learning_rate=3e-4,1e-3,3e-3"
m --grid="method=lora;loraplus_lr_ratio=16;learning_rate=2.5e-4,5e-4,1e-3"
f --seeds=1 --grid="method=prompt;learning_rate=3e-2"
f --seeds=1 --grid="method=lora;loraplus_lr_ratio=16;learning_rate=5e-4"
f --grid="method=prompt;prompt_head=virtual;learning_rate=3e-2"
m --seeds=1 --grid="method=lora;learning_rate=2e-3"
m --seeds=1 --grid="method=full;learning_rate=1e-4"
m --seeds=1 --grid="method=dora;learning_rate=4e-3"
m --seeds=1 --grid="method=ia3;learning_rate=3e-2"
m --seeds=1 --grid="method=vera;learning_rate=3e-2"
m --seeds=1 --grid="method=ln_tuning;learning_rate=1e-2"
m --seeds=1 --grid="method=prompt;learning_rate=1e-2"
m --seeds=1 --grid="method=bitfit;learning_rate=3e-3"
m --seeds=1 --grid="method=adapter_pfeiffer;learning_rate=3e-3"
m --seeds=1 --grid="method=adapter_houlsby;learning_rate=1e-3"
m --seeds=1 --grid="method=lora;loraplus_lr_ratio=16;learning_rate=5e-4"

# 9. The family on STS-B (run with the code of a61a15d): per method three learning rates,
#    a fourth beyond the edge where the best of the three was on it, seed 1 at the best point;
#    then full fine-tuning one step past the top of its STS-B and MRPC grids.
s() { $py -m experiments.sweep --root=runs/family-stsb --task=stsb $c "$@"; }
s --grid="method=dora;learning_rate=2e-3,4e-3,8e-3"
s --seeds=1 --grid="method=dora;learning_rate=4e-3"
s --grid="method=ia3;learning_rate=1e-2,3e-2,1e-1,0.333333"
s --seeds=1 --grid="method=ia3;learning_rate=1e-1"
s --grid="method=vera;learning_rate=1e-2,3e-2,1e-1,3e-1"
s --seeds=1 --grid="method=vera;learning_rate=1e-1"
s --grid="method=ln_tuning;learning_rate=3e-3,1e-2,3e-2"
s --seeds=1 --grid="method=ln_tuning;learning_rate=1e-2"
s --grid="method=adapter_pfeiffer;learning_rate=1e-3,3e-3,1e-2"
s --seeds=1 --grid="method=adapter_pfeiffer;learning_rate=3e-3"
s --grid="method=adapter_houlsby;learning_rate=3e-4,1e-3,3e-3,9e-3"
s --seeds=1 --grid="method=adapter_houlsby;learning_rate=3e-3"
s --grid="method=prompt;learning_rate=3e-3,1e-2,3e-2,1e-1"
s --seeds=1 --grid="method=prompt;learning_rate=1e-2"
s --grid="method=lora;loraplus_lr_ratio=16;learning_rate=3e-4,5e-4,1e-3,2e-3"
s --seeds=1 --grid="method=lora;loraplus_lr_ratio=16;learning_rate=5e-4"
$py -m experiments.sweep --root=runs/methods-stsb --task=stsb $c --grid="method=full;learning_rate=4e-4"
m --grid="method=full;learning_rate=2e-4,4e-4"
m --seeds=1 --grid="method=full;learning_rate=2e-4"

# 10. GLUE at the standard recipe (3 epochs, batch 32, 128 tokens, warmup 6 %): every method,
#     a learning-rate grid per method, the rate and checkpoint picked on a fixed half of each
#     dev set and scored on the other (--select_on=dev_half); the five small tasks first, then
#     SST-2; then seeds 1 and 2 at each method's chosen rate (read from the report's
#     **chosen** rows). Many hours on a 2-core CPU; runs resume.
g() { local m=$1 t=$2 l=$3; shift 3
      $py -m experiments.sweep --root="runs/glue-standard/$m" --model=minilm --data_dir=$data \
      --select_on=dev_half --method="$m" --progress=false --grid="task=$t;learning_rate=$l" \
      --seeds=0 "$@"; }
rates=(lora:2e-4,5e-4,1.25e-3,3e-3 full:1e-5,2e-5,5e-5 bitfit:1e-3,3e-3,1e-2 ia3:3e-3,1e-2,3e-2
       ln_tuning:1e-3,3e-3,1e-2 vera:3e-3,1e-2,3e-2)
for m in "${rates[@]}"; do g "${m%%:*}" wnli,rte,mrpc,stsb,cola "${m#*:}"; done
g adapter_pfeiffer wnli,rte,mrpc,stsb,cola 3e-4,1e-3,3e-3
g dora wnli,rte,mrpc,stsb,cola 5e-4,1.25e-3,3e-3
g adapter_houlsby wnli,rte,mrpc,stsb,cola 3e-4,1e-3,3e-3
g prompt wnli,rte,mrpc,stsb,cola 1e-2,3e-2,1e-1
# the grids' tops where the chosen rate was the top rate
g full cola,mrpc,rte,stsb 1e-4
g full stsb 2e-4,5e-4   # STS-B's selection half still rose at 1e-4
g lora rte,stsb 6e-3
g bitfit stsb 3e-2; g bitfit rte 3e-4; g ia3 stsb,cola,rte 1e-1
g ia3 wnli 1e-3; g ln_tuning mrpc,stsb,cola 3e-2; g ln_tuning rte 3e-4
g vera rte,mrpc,stsb,cola 1e-1; g vera wnli 1e-3
g adapter_pfeiffer mrpc,stsb 1e-2; g adapter_pfeiffer stsb 3e-2; g dora stsb 6e-3
g adapter_houlsby mrpc,stsb 1e-2; g adapter_houlsby rte 1e-4   # (RTE: the grid's bottom)
g prompt stsb 3e-1; g prompt rte 3e-3
g lokr mrpc,stsb 1e-2,3e-2
g loha mrpc,stsb 1e-2
g oft mrpc,stsb 1e-2
g prefix mrpc,stsb 1e-1
g boft mrpc,stsb 1e-2
g fourierft mrpc,stsb 2e-1
g loreft mrpc,stsb 1e-2
g loha mrpc,stsb 3e-2
g boft mrpc,stsb 3e-2
g prefix stsb 3e-1
g loreft stsb 3e-2,1e-1
# the round-two methods on MRPC and STS-B (AdaLoRA: budget warm-up 10 %, fixed pattern 30 %
# of each task's 3-epoch steps)
for m in loha:3e-4,1e-3,3e-3 lokr:3e-4,1e-3,3e-3 oft:3e-4,1e-3,3e-3 boft:3e-4,1e-3,3e-3 \
         fourierft:1e-2,5e-2,1e-1 prefix:3e-3,1e-2,3e-2 loreft:3e-4,1e-3,3e-3; do
    g "${m%%:*}" mrpc,stsb "${m#*:}"; done
g adalora mrpc 1e-3,3e-3,1e-2 --adalora_tinit=35 --adalora_tfinal=100
g adalora stsb 3e-3,1e-2 --adalora_tinit=54 --adalora_tfinal=160   # 1e-3 not run
g adalora mrpc 3e-2 --adalora_tinit=35 --adalora_tfinal=100   # the grid's top, until it peaks inside
g adalora stsb 3e-2 --adalora_tinit=54 --adalora_tfinal=160
# the PyTorch peer (transformers + peft) at the same recipe and protocol, at jaxpeft's chosen
# rates (seed 0 first); its runs read in the report as <method>-torch
peer() { local out="runs/glue-standard/peer/$1-$2-lr$3-seed${4:-0}"
         [ -f "$out/results.json" ] || $py -m benchmarks.torch_run_glue --task="$2" \
         --method="$1" --model=minilm --data_dir=$data --max_steps=0 --num_epochs=3 \
         --select_on=dev_half --learning_rate="$3" --seed="${4:-0}" --output_dir="$out"; }
peer lora mrpc 1.25e-3; peer full mrpc 5e-5; peer lora stsb 3e-3; peer full stsb 5e-5
peer lora cola 1.25e-3; peer full cola 5e-5; peer lora rte 3e-3; peer full rte 5e-5
peer lora wnli 1.25e-3; peer full wnli 1e-5
peer oft mrpc 3e-3; peer oft stsb 3e-3   # a third peft method beside the peer
# seeds 1 and 2 at the chosen rates on both sides, full fine-tuning's MRPC first
g full mrpc 5e-5 --seeds=1,2; peer full mrpc 5e-5 1; peer full mrpc 5e-5 2
g lora mrpc 1.25e-3 --seeds=1,2; peer lora mrpc 1.25e-3 1; peer lora mrpc 1.25e-3 2
g lora cola 1.25e-3 --seeds=1,2; peer lora cola 1.25e-3 1; peer lora cola 1.25e-3 2
peer lora cola 3e-3; peer lora cola 2e-4; peer lora cola 2e-3; g lora cola 2e-3
# ... where the two sides' seeds part: jaxpeft without packing, and more seeds on both sides
$py -m experiments.sweep --root=runs/glue-standard/lora-unpacked --model=minilm --data_dir=$data \
    --select_on=dev_half --method=lora --progress=false --grid="task=cola;learning_rate=1.25e-3" \
    --seeds=0,1,2 --packing=false
g lora cola 1.25e-3 --seeds=3,4,5; for s in 3 4 5; do peer lora cola 1.25e-3 $s; done
g lora rte 3e-3 --seeds=1,2; peer lora rte 3e-3 1; peer lora rte 3e-3 2
g lora stsb 3e-3 --seeds=1,2; peer lora stsb 3e-3 1; peer lora stsb 3e-3 2
g full cola 5e-5 --seeds=1,2; peer full cola 5e-5 1; peer full cola 5e-5 2
g full stsb 2e-4 --seeds=1,2; g full rte 5e-5 --seeds=1,2; peer full stsb 2e-4
for s in 1 2; do peer full stsb 2e-4 $s; peer full rte 5e-5 $s; done
g oft mrpc,stsb 3e-3 --seeds=1; peer oft mrpc 3e-3 1; peer oft stsb 3e-3 1
g bitfit mrpc 3e-3 --seeds=1,2; g bitfit stsb 1e-2 --seeds=1,2
# BitFit predicts CoLA's majority class at every rate of its 3-epoch grid and RTE's near it:
# the same grids at 10 epochs settle whether that is the budget or the method
g10() { g "$@" --root="runs/glue-standard/$1-10ep" --num_epochs=10; }   # the later flags win
g10 bitfit cola 1e-3,3e-3,1e-2; g10 bitfit rte 3e-4,1e-3,3e-3; g10 bitfit cola 3e-3 --seeds=1,2
# LN-tuning's CoLA is BitFit's picture at 3 epochs: the same 10-epoch grid, then its seeds
g10 ln_tuning cola 1e-3,3e-3,1e-2; g10 ln_tuning cola 3e-3 --seeds=1,2
g ia3 cola 3e-2 --seeds=1,2; g ia3 rte 1e-2 --seeds=1,2
g10 ln_tuning rte 1e-4,3e-4,1e-3,3e-3   # RTE stays at the majority class at 3 epochs
g dora mrpc,cola 1.25e-3 --seeds=1,2; g dora stsb 3e-3 --seeds=1,2
g oft mrpc,stsb 3e-3 --seeds=2; peer oft mrpc 3e-3 2; peer oft stsb 3e-3 2
g ia3 mrpc 1e-2 --seeds=1,2; g ia3 stsb 3e-2 --seeds=1,2
g loha mrpc,stsb 1e-2 --seeds=1; g fourierft mrpc,stsb 1e-1 --seeds=1; g boft mrpc,stsb 1e-2 --seeds=1
g lokr mrpc 3e-3 --seeds=1; g lokr stsb 1e-2 --seeds=1
g prefix mrpc 3e-2 --seeds=1; g prefix stsb 1e-1 --seeds=1
g loreft mrpc 3e-3 --seeds=1; g loreft stsb 3e-2 --seeds=1
g adalora mrpc 1e-2 --adalora_tinit=35 --adalora_tfinal=100 --seeds=1
g adalora stsb 1e-2 --adalora_tinit=54 --adalora_tfinal=160 --seeds=1
# ... and on SST-2 at the family study's budget (300 steps, section 6; AdaLoRA's phases 10 %
# and 30 % of them), the study's rates
for m in loha:3e-4,1e-3,3e-3 lokr:3e-4,1e-3,3e-3 oft:3e-4,1e-3,3e-3 boft:3e-4,1e-3,3e-3 \
         fourierft:1e-2,5e-2,1e-1 prefix:3e-3,1e-2,3e-2 loreft:3e-4,1e-3,3e-3; do
    f --grid="method=${m%%:*};learning_rate=${m#*:}"; done
f --grid="method=adalora;learning_rate=3e-4,1e-3,3e-3,1e-2,3e-2" --adalora_tinit=30 --adalora_tfinal=90
# the grids' tops (until each peaks inside), then seed 1 at each method's peak (prefix tuning:
# 3e-2 and 1e-1 tie on accuracy; 3e-2 has the lower loss)
for m in loha:1e-2,3e-2 lokr:1e-2,3e-2 oft:1e-2 boft:1e-2,3e-2 loreft:1e-2,3e-2 prefix:1e-1,3e-1; do
    f --grid="method=${m%%:*};learning_rate=${m#*:}"; done
for m in oft:3e-3 loha:1e-2 lokr:1e-2 boft:1e-2 loreft:1e-2 fourierft:5e-2 prefix:3e-2; do
    f --grid="method=${m%%:*};learning_rate=${m#*:}" --seeds=1; done
f --grid="method=adalora;learning_rate=1e-2" --adalora_tinit=30 --adalora_tfinal=90 --seeds=1
g lora sst2 2e-4,5e-4,1.25e-3,3e-3   # SST-2 for the other methods next
g lora sst2 5e-4 --seeds=1,2
g full sst2 2e-5   # 5e-5 and 1e-4 next
$py -m experiments.report --root=runs/glue-standard --out=docs/results/glue-standard.md \
    --plots_dir=docs/results/plots-glue-standard

# Keep each study's runs as one file (config, results and metric rows of every run).
p() { $py -m experiments.report --root="runs/$1" --pack="docs/studies/$2.jsonl.gz"; }
for s in methods-sst2 methods-stsb rank-sst2 long-stsb family-sst2 family-mrpc family-stsb \
         glue-minilm-lora glue-minilm-bitfit glue-minilm-full glue-standard; do p $s $s; done
# The levers and pooler studies include the runs of block 1 they are compared with.
mkdir -p runs/levers-stsb runs/pooler-sst2/methods-sst2 runs/levers-stsb/methods-stsb
cp -r runs/labelmap-stsb/* runs/levers-stsb/
for r in "method=lora,learning_rate=0.0005,seed=0" "method=bitfit,learning_rate=0.001,seed=0"; do
    cp -r "runs/methods-stsb/$r" runs/levers-stsb/methods-stsb/; done
for r in "method=lora,learning_rate=0.0005,seed=0" "method=lora,learning_rate=0.001,seed=0" \
         "method=bitfit,learning_rate=0.001,seed=0" "method=bitfit,learning_rate=0.01,seed=0"; do
    cp -r "runs/methods-sst2/$r" runs/pooler-sst2/methods-sst2/; done
p levers-stsb levers-stsb
p pooler-sst2 pooler-sst2

r() { $py -m experiments.report "$@"; }
d=docs/studies
for s in methods-sst2 methods-stsb rank-sst2 long-stsb family-mrpc levers-stsb pooler-sst2 \
         glue-standard; do
    r --root=$d/$s.jsonl.gz --out=docs/results/$s.md --plots_dir=docs/results/plots-$s; done
r --root=$d/family-sst2.jsonl.gz --root=$d/methods-sst2.jsonl.gz --out=docs/results/family-sst2.md \
  --plots_dir=docs/results/plots-family-sst2
r --root=$d/family-stsb.jsonl.gz --root=$d/methods-stsb.jsonl.gz --out=docs/results/family-stsb.md \
  --plots_dir=docs/results/plots-family-stsb
for m in lora bitfit full; do cp runs/glue-minilm-$m/glue.md docs/results/glue-minilm-$m.md; done
