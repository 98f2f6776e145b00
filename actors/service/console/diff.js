// A line diff of two texts: the common prefix and suffix taken off, the rest by longest common subsequence
// (bounded: past MAX_CELLS the changed middle is shown as removed, then added).

const MAX_CELLS = 4_000_000;

/**
 * The lines of `oldText` and `newText` as a list of {op: " " | "-" | "+", a: old line number or null,
 * b: new line number or null, text}.
 */
export function lineDiff(oldText, newText) {
  const a = oldText.split("\n");
  const b = newText.split("\n");
  let pre = 0;
  while (pre < a.length && pre < b.length && a[pre] === b[pre]) pre++;
  let suf = 0;
  while (suf < a.length - pre && suf < b.length - pre && a[a.length - 1 - suf] === b[b.length - 1 - suf]) suf++;
  const out = [];
  for (let i = 0; i < pre; i++) out.push({ op: " ", a: i + 1, b: i + 1, text: a[i] });
  const am = a.slice(pre, a.length - suf);
  const bm = b.slice(pre, b.length - suf);
  const n = am.length;
  const m = bm.length;
  if ((n + 1) * (m + 1) > MAX_CELLS) {
    am.forEach((t, i) => out.push({ op: "-", a: pre + i + 1, b: null, text: t }));
    bm.forEach((t, j) => out.push({ op: "+", a: null, b: pre + j + 1, text: t }));
  } else {
    // L[i][j]: the length of the longest common subsequence of am[i:] and bm[j:]
    const L = new Uint32Array((n + 1) * (m + 1));
    const at = (i, j) => i * (m + 1) + j;
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        L[at(i, j)] = am[i] === bm[j] ? L[at(i + 1, j + 1)] + 1 : Math.max(L[at(i + 1, j)], L[at(i, j + 1)]);
      }
    }
    let i = 0;
    let j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && am[i] === bm[j]) {
        out.push({ op: " ", a: pre + i + 1, b: pre + j + 1, text: am[i] });
        i++;
        j++;
      } else if (j >= m || (i < n && L[at(i + 1, j)] >= L[at(i, j + 1)])) {
        out.push({ op: "-", a: pre + i + 1, b: null, text: am[i] });
        i++;
      } else {
        out.push({ op: "+", a: null, b: pre + j + 1, text: bm[j] });
        j++;
      }
    }
  }
  for (let k = suf; k > 0; k--) {
    out.push({ op: " ", a: a.length - k + 1, b: b.length - k + 1, text: a[a.length - k] });
  }
  return out;
}

/**
 * The diff cut to its changes with `context` unchanged lines around each: a list of lines as lineDiff gives them,
 * and {op: "…", skipped: n} for each stretch left out.
 */
export function hunks(lines, context = 3) {
  const keep = new Array(lines.length).fill(false);
  lines.forEach((l, i) => {
    if (l.op !== " ") for (let k = Math.max(0, i - context); k <= Math.min(lines.length - 1, i + context); k++) keep[k] = true;
  });
  const out = [];
  let skipped = 0;
  lines.forEach((l, i) => {
    if (keep[i]) {
      if (skipped) out.push({ op: "…", skipped });
      skipped = 0;
      out.push(l);
    } else {
      skipped++;
    }
  });
  if (skipped) out.push({ op: "…", skipped });
  return out;
}
