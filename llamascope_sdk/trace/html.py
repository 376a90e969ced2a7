"""An offline HTML view of a pruned attribution graph: one self-contained file (inline CSS and
JavaScript, no CDN, no network request).

Nodes sit by position (x, one column per prompt token) and layer (y: embeddings at the
bottom, logits at the top); edges are lines whose width follows |weight| and whose colour its
sign (blue positive, red negative). Clicking a node shows its label, activation, influence,
strongest inputs and outputs, top examples, a link to its feature page, and the
``llamascope steer`` command that tests it. The data is the viewer JSON of
:mod:`.export` plus the notes, embedded as a JSON script element.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from llamascope_sdk.trace.export import FeatureNote

_CSS = """
body{font:14px system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#main{flex:1;overflow:auto;padding:8px}#side{width:380px;overflow:auto;border-left:1px solid #ccc;
padding:10px;background:#fafafa}h1{font-size:16px;margin:4px 0}.muted{color:#777}
svg text{font-size:10px;fill:#555}circle,rect{cursor:pointer;stroke:#333;stroke-width:.5}
.sel{stroke:#000!important;stroke-width:2.5!important}code{background:#eee;padding:2px 4px;
display:block;white-space:pre-wrap;word-break:break-all}.ex{margin:4px 0;font-family:monospace}
.ex b{background:#fc8}table{border-collapse:collapse}td{padding:1px 6px}
"""

_JS = r"""
const G=JSON.parse(document.getElementById('graph-data').textContent);
const N=G.graph.nodes,L=G.graph.links,notes=G.notes,toks=G.graph.metadata.prompt_tokens;
const nl=G.n_layers,cw=90,rh=46,pad=60,W=pad+toks.length*cw,H=pad+(nl+2)*rh+40;
const ns='http://www.w3.org/2000/svg',svg=document.createElementNS(ns,'svg');
svg.setAttribute('width',W);svg.setAttribute('height',H);
function row(n){return n.layer==='E'?0:(n.feature_type==='logit'?nl+1:(+n.layer)+1);}
const cells={};N.forEach(n=>{const k=row(n)+'/'+n.ctx_idx;(cells[k]=cells[k]||[]).push(n);});
const pos={};Object.values(cells).forEach(c=>c.forEach((n,i)=>{
 pos[n.node_id]=[pad+n.ctx_idx*cw+cw/2+(i-(c.length-1)/2)*Math.min(14,(cw-10)/c.length),
 H-pad-row(n)*rh];}));
function el(t,a){const e=document.createElementNS(ns,t);for(const k in a)e.setAttribute(k,a[k]);
 svg.appendChild(e);return e;}
toks.forEach((t,i)=>{const e=el('text',{x:pad+i*cw+cw/2,y:H-20,'text-anchor':'middle'});
 e.textContent=t;});
for(let r=0;r<=nl+1;r++){const e=el('text',{x:4,y:H-pad-r*rh+3});
 e.textContent=r===0?'emb':(r===nl+1?'logit':'L'+(r-1));}
const mx=Math.max(1e-12,...L.map(l=>Math.abs(l.weight)));const lines=[];
L.forEach(l=>{const a=pos[l.source],b=pos[l.target];if(!a||!b)return;
 const e=el('line',{x1:a[0],y1:a[1],x2:b[0],y2:b[1],stroke:l.weight>0?'#36c':'#d33',
 'stroke-opacity':0.15+0.6*Math.abs(l.weight)/mx,'stroke-width':0.5+3*Math.abs(l.weight)/mx});
 lines.push([e,l]);});
const colour={'cross layer transcoder':'#fd8','mlp reconstruction error':'#bbb',
 embedding:'#9d9',logit:'#9cf'};const shapes={};
N.forEach(n=>{const p=pos[n.node_id];const s=n.feature_type==='cross layer transcoder'?
 el('circle',{cx:p[0],cy:p[1],r:6,fill:colour[n.feature_type]}):
 el('rect',{x:p[0]-6,y:p[1]-6,width:12,height:12,fill:colour[n.feature_type]});
 s.addEventListener('click',()=>show(n));shapes[n.node_id]=s;});
document.getElementById('main').appendChild(svg);
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function name(id){const n=N.find(m=>m.node_id===id);return n?(n.clerp||id):id;}
function edges(list,key){return '<table>'+list.sort((a,b)=>Math.abs(b.weight)-Math.abs(a.weight))
 .slice(0,8).map(l=>'<tr><td>'+l.weight.toFixed(3)+'</td><td>'+esc(name(l[key]))+'</td></tr>')
 .join('')+'</table>';}
function show(n){Object.values(shapes).forEach(s=>s.classList.remove('sel'));
 shapes[n.node_id].classList.add('sel');
 const note=notes[n.layer+'_'+n.feature]||null;let h='<h1>'+esc(n.node_id)+'</h1>';
 h+='<p>'+esc(n.feature_type)+', position '+n.ctx_idx+' ('+esc(toks[n.ctx_idx]||'')+')</p>';
 if(n.clerp)h+='<p><b>'+esc(n.clerp)+'</b></p>';
 if(n.activation!==null)h+='<p>activation '+n.activation.toFixed(3)+'</p>';
 if(n.influence!==null)h+='<p class="muted">cumulative influence '+n.influence.toFixed(3)+'</p>';
 if(note){if(note.steer)h+='<p>test it:</p><code>'+esc(note.steer)+'</code>';
  if(note.page)h+='<p><a href="file://'+esc(note.page)+'">feature page</a></p>';
  note.examples.forEach(e=>{h+='<div class="ex">'+e.tokens.map((t,i)=>i===e.max_index?
   '<b>'+esc(t)+'</b>':esc(t)).join('')+' <span class="muted">('+e.max.toFixed(2)+')</span></div>';});}
 h+='<h1>inputs</h1>'+edges(L.filter(l=>l.target===n.node_id),'source');
 h+='<h1>outputs</h1>'+edges(L.filter(l=>l.source===n.node_id),'target');
 document.getElementById('side').innerHTML=h;
 lines.forEach(([e,l])=>{const on=l.source===n.node_id||l.target===n.node_id;
  e.setAttribute('stroke-opacity',on?0.9:0.05);});}
"""


def _feature_key(layer: int, feat: int) -> str:
    return f"{layer}_{feat}"


def render(viewer: dict[str, Any], n_layers: int,
           notes: Mapping[tuple[int, int], FeatureNote] | None = None) -> str:
    """The HTML page of a viewer JSON (:func:`.export.viewer_json`), notes keyed by
    (layer, feature index); the viewer's ``feature`` of a feature node is a Cantor pairing,
    so notes are re-keyed here by the node's layer and Cantor id."""
    by_id: dict[str, Any] = {}
    for (layer, feat), note in (notes or {}).items():
        cantor = (layer + feat) * (layer + feat + 1) // 2 + feat
        by_id[_feature_key(layer, cantor)] = {"label": note.label, "examples": note.examples,
                                              "page": note.page, "steer": note.steer}
    data = json.dumps({"graph": viewer, "notes": by_id, "n_layers": n_layers},
                      ensure_ascii=False).replace("</", "<\\/")
    meta = viewer["metadata"]
    title = html.escape(f"attribution graph: {meta['prompt'] or ' '.join(meta['prompt_tokens'])}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><div id='main'><h1>{title}</h1>"
            f"<p class='muted'>{len(viewer['nodes'])} nodes, {len(viewer['links'])} edges; "
            "x: token position, y: layer; blue: positive effect, red: negative; click a node"
            "</p></div><div id='side'><p class='muted'>Click a node.</p></div>"
            f"<script type='application/json' id='graph-data'>{data}</script>"
            f"<script>{_JS}</script></body></html>")
